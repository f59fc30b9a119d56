"""Pass 6b: decide how each chain becomes reversible couplings (MEFT / RevNet).

Per chain: the coupling (which stream each block's pretrained function goes
to, the scalings λ and β, whether streams switch), which blocks each
coupling step covers, and where adapters go. The anchors and measured
errors are filled in later by ``calibrate_reversible``, which needs the
converted module.

Before::

    Chain(blocks=[layer.0 … layer.11])

After (``coupling="meft1"``)::

    ReversiblePlan(coupling=Coupling("meft1", λ=0.1, β=1, switch=True, output="s2"),
                   steps=((0,), (1,), …, (11,)), adapter_rank=8, adapter_init="zero")

Couplings (``y1 = λ·x1 + F(x2)``, ``y2 = β·x2 + G(y1)``):

* ``meft1``: F = block + adapter, G = adapter; streams switched. The
  function rides on ``y1``.
* ``meft2``: F = adapter, G = block + adapter; switched. The function rides on ``y2``.
* ``meft3``: F = the block's first residual sub-layer (attention) + adapter,
  G = its second (MLP) + adapter; not switched. Needs two residual sub-layers;
  with more (a decoder's self-attention, cross-attention, MLP) F takes all
  but the last.
* ``revnet``: λ = β = 1, F and G are the residual functions ``block(x) − x``
  of two consecutive blocks, no adapters. For training from scratch: it does
  not preserve the pretrained function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from revify.runtime.adapter import ADAPTER_INITS
from revify.runtime.couplings import Coupling
from revify.runtime.reconstruction import AnchorSet

from revify.passes.analysis.chain_types import Chain, Rejection

# scalings as in the MEFT reference code; output: the stream that carries the
# pretrained function after a step, named after the switch (s1, s2)
COUPLINGS: dict[str, Coupling] = {
    "meft1": Coupling("meft1", lam=0.1, beta=1.0, switch=True, output="s2"),
    "meft2": Coupling("meft2", lam=1.0, beta=0.1, switch=True, output="s1"),
    "meft3": Coupling("meft3", lam=0.1, beta=0.1, switch=False, output="s2"),
    "revnet": Coupling("revnet", lam=1.0, beta=1.0, switch=False, output="mean"),
}


@dataclass(frozen=True)
class ReversibleOptions:
    coupling: str = "meft1"
    lam: float | None = None  # None: the coupling's default
    beta: float | None = None
    adapter_rank: int = 8
    adapter_init: str = "zero"
    freeze_backbone: bool = True
    tolerance: float = 1e-4  # relative reconstruction error allowed, measured at conversion
    stream_dtype: str | None = None  # None: one step wider than the blocks compute in
    check_reconstruction: bool = False

    def validate(self) -> None:
        if self.coupling not in COUPLINGS:
            raise ValueError(f"unknown coupling {self.coupling!r}; choose one of {', '.join(COUPLINGS)}")
        for name in ("lam", "beta"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be positive and finite (the inverse divides by it), got {v}")
        if self.adapter_rank < 1:
            raise ValueError(f"adapter_rank must be at least 1, got {self.adapter_rank}")
        if self.adapter_init not in ADAPTER_INITS:
            raise ValueError(f"unknown adapter_init {self.adapter_init!r}; choose one of {', '.join(ADAPTER_INITS)}")
        if not (self.tolerance > 0 and math.isfinite(self.tolerance)):
            raise ValueError(f"tolerance must be positive and finite, got {self.tolerance}")
        if self.stream_dtype not in (None, "float64", "float32", "bfloat16", "float16"):
            raise ValueError(f"unknown stream_dtype {self.stream_dtype!r}")


@dataclass
class ReversiblePlan:
    chain: Chain
    coupling: Coupling
    steps: tuple[tuple[int, ...], ...]
    options: ReversibleOptions
    # filled by calibrate_reversible, measured on the example inputs
    anchors: tuple[int, ...] = ()
    step_errors: list[float] = field(default_factory=list)  # achieved error of each step's reconstructed input
    start_error: float | None = None  # chain output vs the pretrained chain, eval mode
    start_bound: float | None = None
    output_error: float | None = None  # model output vs the original model, eval mode
    precision: str | None = None  # the precision state ``anchors`` were calibrated in, e.g. "float32"
    calibrated_on: str | None = None  # e.g. "the example inputs, 3 dropout draws"
    gradient_error: float | None = None  # measured against stored activations on those draws
    reconstruction_tolerance: float | None = None  # the anchors' bound that achieved it (≤ tolerance)
    # anchors for other precision states (autocast), calibrated on the first training step in each;
    # shared with the runtime chain, which fills it
    anchor_sets: dict[str, AnchorSet] = field(default_factory=dict)
    # predictions of the budget planner (strategy="auto")
    predicted_saved_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    predicted_recompute_s: float | None = None
    recompute_fraction: float | None = None  # replayed forward / one forward of the whole model

    @property
    def segments(self) -> list[tuple[int, int, float]]:
        """Reversible segments between stored anchors: (first step, end step, max error)."""
        n = len(self.steps)
        bounds = sorted(set((0,) + self.anchors)) + [n]
        errs = self.step_errors or [0.0] * n
        return [(a, b, max(errs[a:b], default=0.0)) for a, b in zip(bounds, bounds[1:])]


_CHANNELS_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm,
                   nn.InstanceNorm2d)


def features_last(block: nn.Module, shape: tuple[int, ...]) -> bool:
    """Does ``block`` treat the last dimension of its hidden input as features (channels-last)?

    The first layer with weights decides: a convolution or batch/group norm
    reads channels from dimension 1; a linear layer or a norm over the last
    dimension of the input's size reads them from the last.
    """
    for m in block.modules():
        if isinstance(m, _CHANNELS_FIRST):
            return False
        if isinstance(m, nn.Linear):
            return m.in_features == shape[-1]
        normalized = getattr(m, "normalized_shape", None)
        if normalized is not None:
            return tuple(normalized)[-1:] == tuple(shape[-1:])
        weight = getattr(m, "weight", None)
        if isinstance(weight, nn.Parameter) and not list(m.children()):  # an RMSNorm-like scale
            return weight.dim() == 1 and weight.shape[0] == shape[-1]
    return False


def plan_reversible(chain: Chain, options: ReversibleOptions, model: nn.Module | None = None
                    ) -> ReversiblePlan | Rejection:
    """``model`` (the analysed module) lets MEFT accept channels-last feature maps (B, H, W, C)."""
    blocks = chain.blocks
    base = COUPLINGS[options.coupling]
    coupling = Coupling(base.name, base.lam if options.lam is None else options.lam,
                        base.beta if options.beta is None else options.beta, base.switch, base.output)
    first = blocks[0]
    where = f"{first.path} … {blocks[-1].path}"
    # the very tensor it was given, unmodified (an in-place ``x += f(x)`` bumps the version)
    if any(b.call.hidden_out_id is not None and b.call.hidden_out_id == b.call.hidden_in_id
           and b.call.hidden_out_version == b.call.hidden_in_version for b in blocks):
        return Rejection(where, f"identity blocks without compute ({first.module_type} returns its input "
                                "unchanged): nothing to make reversible, and adapters there would change the model")
    if chain.shared:
        return Rejection(where, "shared module: one module is several blocks of this chain (called several times "
                                "per forward, as in ALBERT); a reversible chain needs one module per coupling step, "
                                "since its adapters and installed forward live on the module")
    fed = chain.side_inputs_from_blocks
    if fed:
        k = fed[0]
        return Rejection(where, f"{blocks[k].path} receives a tensor an earlier block of the chain computed and "
                                "returned (T5's position bias); its gradient would flow between coupling steps "
                                "outside the hidden state")
    groups = chain.side_groups
    if base.name == "revnet" and any(groups[i] != groups[i + 1] for i in range(0, len(groups) - 1, 2)):
        # a RevNet step runs two blocks (F, G) at the first one's call, with its side inputs; MEFT steps
        # are one block each and run with that block's own (Gemma 2's alternating masks)
        return Rejection(where, "coupling='revnet' pairs consecutive blocks into one step, and these pairs "
                                "receive different side inputs (e.g. alternating sliding/full attention masks); "
                                "use a MEFT coupling, whose steps are one block each")
    shape = first.call.hidden_in_shape or ()
    if base.name != "revnet" and len(shape) not in (2, 3) and not (
            len(shape) > 3 and model is not None and features_last(model.get_submodule(first.path), shape)):
        return Rejection(where, f"MEFT adapters act on the last (feature) dimension of (batch, features), "
                                f"(batch, tokens, features) or channels-last (batch, …, channels) hidden states; "
                                f"this chain carries shape {shape} with channels first: use coupling='revnet'")
    if base.name == "meft3":
        bad = [b for b in blocks if b.sublayers < 2 or "partial" in b.residual]
        if bad:
            return Rejection(where, f"meft3 needs blocks with two residual sub-layers (attention, MLP); "
                                    f"{bad[0].path} has {bad[0].residual}")
    if base.name == "revnet":
        steps = tuple(tuple(range(i, min(i + 2, len(blocks)))) for i in range(0, len(blocks), 2))
    else:
        steps = tuple((i,) for i in range(len(blocks)))
    return ReversiblePlan(chain, coupling, steps, options)


def plan_reversible_runs(chain: Chain, options: ReversibleOptions, model: nn.Module | None = None
                         ) -> list[ReversiblePlan | Rejection]:
    """The whole chain where it can be planned; else each run of blocks that share their side inputs, and
    a refusal, by name, of the blocks left outside every run.

    MEFT steps are one block each and run with that block's own side inputs, so Gemma 3 (sliding layers
    0-4, full layer 5, sliding layer 6) is one chain. Two side-input causes refuse the whole chain and
    are planned per run of blocks that share their side inputs instead: a RevNet step runs two blocks
    with the first one's, and a side input an earlier block computed (T5's position bias, from block
    0) would carry gradient between steps outside the hidden state. The blocks outside every run are
    refused with that cause; any other refusal of the whole chain stands as it is.

    Before::  Chain(blocks=[layers.0 … layers.6], side_groups=(0, 0, 0, 0, 0, 1, 0))
    After::   [ReversiblePlan(layers.0 … layers.6)]                                  (meft1, meft2, meft3)
              [ReversiblePlan(layers.0 … layers.4),
               Rejection("layers.5 … layers.6", "coupling='revnet' pairs ... these blocks run unchanged")]
    """
    whole = plan_reversible(chain, options, model)
    side_cause = bool(chain.side_inputs_from_blocks) or (
        options.coupling == "revnet" and len(set(chain.side_groups)) > 1)
    if isinstance(whole, ReversiblePlan) or not side_cause or len(set(chain.side_groups)) <= 1:
        return [whole]
    parts = chain.parts_with_same_side_inputs()
    decided: list[ReversiblePlan | Rejection] = [plan_reversible(p, options, model) for p in parts]
    covered = {id(b) for p in parts for b in p.blocks}  # the parts hold the chain's own BlockInfo objects
    groups = chain.side_groups
    pattern = "".join(chr(ord("A") + g) for g in groups)
    left: list[list[int]] = []  # consecutive ranges of block indices outside every run
    for i, b in enumerate(chain.blocks):
        if id(b) in covered:
            continue
        if left and left[-1][-1] == i - 1:
            left[-1].append(i)
        else:
            left.append([i])
    for idx in left:
        first, last = chain.blocks[idx[0]], chain.blocks[idx[-1]]
        where = first.path if len(idx) == 1 else f"{first.path} … {last.path}"
        decided.append(Rejection(where, f"{whole.reason} (side inputs by block: pattern {pattern}); the runs of "
                                        "two or more blocks that share theirs convert, and "
                                        f"{'this block runs' if len(idx) == 1 else 'these blocks run'} unchanged"))
    return decided
