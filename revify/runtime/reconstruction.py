"""Runtime: how exactly a reversible chain reconstructs its activations, checked and calibrated.

Backward reconstructs each step's input from its output by dividing by λ and
β, which amplifies rounding error step by step. *Anchors* are steps whose exact
inputs are stored instead; they are chosen by measured error, per precision
state (fp32, bf16 autocast, ...), since bf16 recompute noise is ~1000× fp32's.
A ``Probe`` compares reconstructed streams with exact ones: ``check`` raises
``ReconstructionError`` past a tolerance (debug mode), ``calibrate`` places an
anchor there and goes on from the exact value, so one backward pass finds the
greedy anchors.

Before: ``ReversibleChain(anchors=())`` on a deep fp32 chain, relative error 3e-3 at block 0.
After: ``AnchorSet("float32", anchors=(11,), step_errors=[...], calibrated_on="example inputs")``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


class ReconstructionError(RuntimeError):
    """A reconstructed activation differs from the stored one by more than the tolerance."""


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    exact64 = exact.detach().double()
    denom = exact64.norm().item()
    return (approx.detach().double() - exact64).norm().item() / max(denom, 1e-30)


def precision_state(x: torch.Tensor) -> str:
    """The precision the blocks compute in, as a label: ``"float32"``, ``"float32, autocast cpu bfloat16"``.

    Reconstruction error depends on it (bf16 recompute noise is ~1000× fp32's), so anchors are
    kept per precision state.
    """
    device = x.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return f"{str(x.dtype).removeprefix('torch.')}, autocast {device} " \
               f"{str(torch.get_autocast_dtype(device)).removeprefix('torch.')}"
    return str(x.dtype).removeprefix("torch.")


@dataclass
class AnchorSet:
    """Anchors calibrated for one precision state, and the reconstruction error they achieved."""

    precision: str
    anchors: tuple[int, ...]
    step_errors: list[float]  # per step: relative error of its reconstructed input (0 at anchors)
    calibrated_on: str  # "example inputs" (conversion) or "first training step"

    @property
    def max_error(self) -> float:
        return max(self.step_errors, default=0.0)


@dataclass
class Probe:
    """Compares reconstructed streams with exact ones, for checking or calibration.

    ``mode="check"`` raises ``ReconstructionError`` when the error exceeds
    ``tolerance``. ``mode="calibrate"`` places an anchor where it would, and
    goes on from the exact value: one backward pass finds the greedy anchors.
    """

    mode: str
    tolerance: float
    errors: dict[int, float] = field(default_factory=dict)  # step → error of its reconstructed input
    new_anchors: set[int] = field(default_factory=set)
    exact: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    precision: str | None = None  # the precision state the probed run ran in (``precision_state``)
    auto: bool = False  # started by the chain itself: its backward records the anchors it finds

    def visit(self, step: int, which: int, approx: torch.Tensor, where: str) -> torch.Tensor:
        exact = self.exact[step][which]
        err = relative_error(approx, exact)
        self.errors[step] = max(self.errors.get(step, 0.0), err)
        if err <= self.tolerance:  # NaN compares False: flagged
            return approx
        if self.mode == "check":
            raise ReconstructionError(
                f"{where}: reconstructed input of block {step} differs from the stored one by "
                f"{err:.3g} relative (tolerance {self.tolerance:g}); convert with a smaller tolerance "
                "or more anchors")
        self.new_anchors.add(step)
        return exact

