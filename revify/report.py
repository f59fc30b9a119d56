"""Before/after report of a revified model, built from measurements only.

``report(model, rmodel, example_inputs)`` runs the original and the revified
model on the user's example inputs and compares what was *measured* (see
:mod:`revify.measure`): bytes saved for backward, peak live tensor bytes and
step time.  Nothing here is estimated from shapes, so the figures are honest
for these inputs on this device -- and only for them; the header says so.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from revify.measure import ExampleInputs, StepMeasurement, measure_step
from revify.units import format_bytes

__all__ = ["MemoryReport", "report", "format_bytes", "default_loss_fn"]


def _format_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.3f} s"


def _ratio(after: float, before: float) -> float | None:
    if before == 0:
        return None if after != 0 else 1.0
    return after / before


def _format_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.3f}x"


@dataclass
class MemoryReport:
    """Measured before/after figures of one training step."""

    before: StepMeasurement
    after: StepMeasurement
    plan_summary: str = ""
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"

    def ratios(self) -> dict[str, float | None]:
        """after/before ratios (None where before is 0 and after is not)."""
        return {
            "saved": _ratio(self.after.saved_bytes, self.before.saved_bytes),
            "peak": _ratio(self.after.peak_bytes, self.before.peak_bytes),
            "time": _ratio(self.after.step_time_s, self.before.step_time_s),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": asdict(self.before),
            "after": asdict(self.after),
            "ratios": self.ratios(),
            "plan_summary": self.plan_summary,
            "notes": list(self.notes),
            "device": self.device,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        r = self.ratios()
        rows = [
            ("", "before", "after", "ratio"),
            (
                "saved for backward",
                format_bytes(self.before.saved_bytes),
                format_bytes(self.after.saved_bytes),
                _format_ratio(r["saved"]),
            ),
            (
                "peak live tensors",
                format_bytes(self.before.peak_bytes),
                format_bytes(self.after.peak_bytes),
                _format_ratio(r["peak"]),
            ),
            (
                "step time",
                _format_time(self.before.step_time_s),
                _format_time(self.after.step_time_s),
                _format_ratio(r["time"]),
            ),
        ]
        w0 = max(len(row[0]) for row in rows)
        wc = [max(len(row[i]) for row in rows) for i in (1, 2, 3)]
        lines = [
            f"revify report -- figures MEASURED on the example inputs on "
            f"{self.device.upper() if self.device == 'cpu' else self.device} "
            f"(one forward+backward step; not estimates)"
        ]
        for row in rows:
            lines.append(
                f"  {row[0]:<{w0}}  {row[1]:>{wc[0]}}  {row[2]:>{wc[1]}}  {row[3]:>{wc[2]}}"
            )
        lines.append(
            f"  (saved tensors: {self.before.saved_tensors} -> {self.after.saved_tensors})"
        )
        if self.plan_summary:
            lines.append("plan:")
            lines.extend("  " + ln for ln in self.plan_summary.splitlines())
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)


def default_loss_fn(out: Any) -> torch.Tensor:
    """Pick a tensor from a model output and return ``out.float().pow(2).mean()``."""
    if hasattr(out, "logits") and getattr(out, "logits") is not None:
        t = out.logits
    elif hasattr(out, "last_hidden_state") and getattr(out, "last_hidden_state") is not None:
        t = out.last_hidden_state
    elif isinstance(out, (tuple, list)):
        t = out[0]
    elif isinstance(out, torch.Tensor):
        t = out
    else:
        raise TypeError(
            f"cannot derive a loss from model output of type {type(out).__name__}; "
            "pass loss_fn=..."
        )
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"model output element is {type(t).__name__}, not a tensor; pass loss_fn=...")
    return t.float().pow(2).mean()


def _device_of(model: Any) -> str:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return str(p.device)
    return "cpu"


def _plan_summary(rmodel: Any) -> str:
    plan = getattr(rmodel, "revify_plan", None)
    if plan is None:
        return ""
    summary = getattr(plan, "summary", None)
    if callable(summary):
        return str(summary())
    return str(plan)


def report(
    model: Callable[..., Any],
    rmodel: Callable[..., Any],
    example_inputs: ExampleInputs,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    *,
    repeats: int = 3,
) -> MemoryReport:
    """Measure ``model`` (before) and ``rmodel`` (after) on ``example_inputs``."""
    fn = loss_fn if loss_fn is not None else default_loss_fn
    before = measure_step(model, example_inputs, fn, repeats=repeats)
    after = measure_step(rmodel, example_inputs, fn, repeats=repeats)
    notes: list[str] = []
    if before.saved_bytes and after.saved_bytes > before.saved_bytes:
        notes.append("revified model saves MORE for backward than the original")
    return MemoryReport(
        before=before,
        after=after,
        plan_summary=_plan_summary(rmodel),
        notes=notes,
        device=_device_of(model),
    )
