"""Where in a training step memory peaks: live and peak bytes at every block boundary.

A diagnostic for planner predictions that miss on a GPU. One step of the
model runs with a mark at the start and end of each named module's forward
and backward (forward hooks; tensor hooks on its output and input for
backward), after the loss, and at the end. At each mark it records, above
what was allocated when the step started, the bytes alive and the peak since
the previous mark, as the dispatch-level tracker counts them (what the
planner profiles with) and, on CUDA, as the caching allocator does (what
``max_memory_allocated`` reports). Where the two columns part, the planner
cannot see the bytes; where both agree and the prediction is still off, the
planner's model of the step is wrong.

    python bench/peak_timeline.py --quick                       # tiny BERT on CPU
    python bench/peak_timeline.py --rows perblock budget-min    # BERT-large on the GPU, the suite's plans
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import torch

from revify.device_step import precision, run_model, train_step, with_precision, zero_grads
from revify.storage_tracking import AllocatorPeaks, LiveStorageTracker
from revify.units import format_bytes


@dataclass(frozen=True)
class Mark:
    name: str
    live: int  # tracker: bytes alive, above the step's start
    peak: int  # tracker: peak since the previous mark
    alloc_live: int | None  # allocator, likewise (CUDA only)
    alloc_peak: int | None


def step_timeline(model: torch.nn.Module, inputs: Any, loss_fn: Callable[[Any], torch.Tensor],
                  modules: dict[str, torch.nn.Module], device: torch.device) -> list[Mark]:
    """One training step of ``model`` with marks around each of ``modules`` (name -> submodule)."""
    tracker = LiveStorageTracker()
    allocator = AllocatorPeaks(device) if device.type == "cuda" else None
    marks: list[Mark] = []

    def mark(name: str) -> None:
        alloc_live, alloc_peak = (None, None) if allocator is None else allocator.read()
        marks.append(Mark(name, tracker.live_bytes, tracker.peak_bytes, alloc_live, alloc_peak))
        tracker.peak_bytes = tracker.live_bytes

    def first_grad_tensor(value: Any) -> torch.Tensor | None:
        values = value if isinstance(value, (tuple, list)) else [value]
        return next((v for v in values if isinstance(v, torch.Tensor) and v.requires_grad), None)

    handles = []
    for name, module in modules.items():
        def pre(mod: Any, args: Any, name: str = name) -> None:
            mark(f"fwd> {name}")
            x = first_grad_tensor(args)
            if x is not None:
                x.register_hook(lambda g, name=name: mark(f"bwd< {name}"))

        def post(mod: Any, args: Any, output: Any, name: str = name) -> None:
            mark(f"fwd< {name}")
            y = first_grad_tensor(output if not hasattr(output, "to_tuple") else output.to_tuple())
            if y is not None:
                y.register_hook(lambda g, name=name: mark(f"bwd> {name}"))

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    zero_grads(model)
    gc.collect()
    if allocator is not None:
        allocator.start()
    try:
        with tracker:
            mark("start")
            out = run_model(model, inputs)
            loss = loss_fn(out)
            del out
            mark("loss")
            loss.backward()
            del loss
            mark("end")
    finally:
        for h in handles:
            h.remove()
        zero_grads(model)
    return marks


def format_timeline(marks: list[Mark]) -> list[str]:
    """One line per mark; the step's peak (tracker, allocator) on the last line."""
    def b(x: int | None) -> str:
        return "n/a" if x is None else format_bytes(x)
    lines = [f"{'mark':<34} {'live':>11} {'peak':>11} {'alloc live':>11} {'alloc peak':>11} {'alloc-trk':>11}"]
    for m in marks:
        diff = None if m.alloc_peak is None else m.alloc_peak - m.peak
        lines.append(f"{m.name:<34} {b(m.live):>11} {b(m.peak):>11} {b(m.alloc_live):>11} {b(m.alloc_peak):>11} "
                     f"{'n/a' if diff is None else format_bytes(diff) if diff >= 0 else '-' + format_bytes(-diff):>11}")
    top = max(marks, key=lambda m: m.peak)
    lines.append(f"tracker peak {b(top.peak)} before '{top.name}'")
    if marks[0].alloc_peak is not None:
        top = max(marks, key=lambda m: m.alloc_peak or 0)
        lines.append(f"allocator peak {b(top.alloc_peak)} before '{top.name}'")
    return lines


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import gpu_suite as gs
    from gpu_suite import Row, Suite, _loss

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=gs.MODELS, default="bert")
    ap.add_argument("--rows", nargs="+", default=["perblock", "budget-min"],
                    choices=[r for r in gs.EAGER_ROWS if r not in ("plain", "hf")])
    ap.add_argument("--quick", action="store_true", help="tiny shapes on CPU")
    args = ap.parse_args(argv)
    suite = Suite(gs.parse_args(["--models", args.model, "--pairs", "1", "--out", tempfile.gettempdir()]
                                + (["--quick"] if args.quick else [])))
    for row in ("plain", "hf"):  # the budget rows' budgets come from these rows' measured peaks
        suite.run_row(args.model, row)
    w = suite.workload(args.model)
    for row in args.rows:
        out = Row(args.model, row, gs.LABELS[row])
        with precision(suite.device, suite.args.dtype, cache_enabled=False):
            model, _, _ = suite.build_row(w, row, out)
        stepped = with_precision(model, suite.device, suite.args.dtype)
        target = stepped.model if hasattr(stepped, "model") else stepped
        target = target.model if row == "stored" else target
        modules = {n: m for n, m in target.named_modules() if _is_marked(n)}
        train_step(stepped, w.inputs, _loss)  # warm-up, as the suite measures
        marks = step_timeline(stepped, w.inputs, _loss, modules, suite.device)
        print(f"\n== {args.model} {row}: predicted {format_bytes(out.predicted) if out.predicted else 'n/a'}; "
              f"{out.note}")
        print("\n".join(format_timeline(marks)))
    return 0


def _is_marked(name: str) -> bool:
    """Each layer of the encoder/decoder stack and the embeddings (the chains and their stem)."""
    parts = name.split(".")
    return (len(parts) >= 2 and parts[-2] == "layer" or parts[-2:-1] == ["layers"]) and parts[-1].isdigit() \
        or parts[-1] in ("embeddings", "embed_tokens")


if __name__ == "__main__":
    sys.exit(main())
