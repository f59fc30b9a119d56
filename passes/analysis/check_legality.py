"""Pass 4: is a block safe to recompute? Every rejection carries a reason.

Before::

    CallRecord(path="layer2.0", hidden_in=(4,16,16,16), hidden_out=(4,32,8,8), ...)

After::

    Legality(ok=False, reasons=["changes shape (4, 16, 16, 16) → (4, 32, 8, 8)"], notes=[])

Checks, from the recorded call and the block's graph:

* shape or dtype changes between the hidden input and output (rejected);
* concatenation shortcuts ``cat(x, f(x))`` (rejected: not a residual);
* in-place mutation of an input (rejected: recompute would read the mutated value);
* a module called several times per forward (rejected, unless every call is
  a block of one chain: ``find_chains`` then passes ``call_count=1`` and each
  call is checkpointed on its own);
* mutable non-tensor arguments such as a KV cache (rejected: recompute would update it twice;
  the runtime checks every call's arguments the same way, ``runtime/argument_check``);
* buffers mutated in forward, e.g. BatchNorm running stats (allowed: the
  runtime swaps in a copy during recompute so they are updated exactly once);
* random ops such as dropout (allowed: checkpoint replays the RNG state);
* data-dependent control flow, seen as a capture failure (allowed for
  checkpointing, which re-runs the same Python on the same inputs and RNG;
  recorded so that architecture-changing strategies can refuse it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from revify.passes.capture.capture import BlockGraph
from revify.passes.analysis.find_residual_blocks import ResidualSpine
from revify.passes.capture.record_calls import CallRecord


@dataclass(frozen=True)
class Legality:
    ok: bool
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def check_legality(rec: CallRecord, call_count: int, graph: BlockGraph | None,
                   spine: ResidualSpine | None, mutated_buffers: list[str]) -> Legality:
    """``mutated_buffers``: qualified names of buffers the block's subtree updated."""
    reasons: list[str] = []
    notes: list[str] = []
    if rec.hidden_out_shape is None:
        reasons.append("output carries no tensor to pass on")
    elif rec.hidden_in_shape != rec.hidden_out_shape:
        reasons.append(f"changes shape {rec.hidden_in_shape} → {rec.hidden_out_shape}")
    elif rec.hidden_in_dtype != rec.hidden_out_dtype:
        reasons.append(f"changes dtype {rec.hidden_in_dtype} → {rec.hidden_out_dtype}")
    if spine is not None and spine.concat_shortcut:
        reasons.append("concatenation shortcut cat(x, f(x)) is not a residual")
    if rec.mutated_inputs:
        reasons.append("mutates an input in place (recompute would read the mutated value)")
    if call_count > 1:
        reasons.append(f"called {call_count} times per forward (shared module)")
    mutable = [str(key[1]) for key, kind, _ in rec.side_signature if kind == "object"]
    if mutable:
        reasons.append(f"receives mutable object argument(s) {', '.join(mutable)} "
                       "(e.g. a KV cache passed explicitly; revify turns use_cache off for training calls)")
    if mutated_buffers:
        shown = ", ".join(mutated_buffers[:3]) + (", ..." if len(mutated_buffers) > 3 else "")
        notes.append(f"updates buffers {shown} in forward: "
                     "recompute runs on a copy of their pre-forward values, so they are updated once")
    if rec.random_ops & {"bernoulli_", "bernoulli", "native_dropout", "dropout", "rand", "randn", "rand_like"}:
        notes.append("random ops (dropout): recompute replays the recorded RNG state")
    if graph is not None and graph.engine == "opaque":
        kind = "data-dependent control flow" if "data-dependent" in graph.reason or "control flow" in graph.reason \
            else "untraceable"
        notes.append(f"opaque block ({kind}): recomputed as a whole")
    return Legality(ok=not reasons, reasons=tuple(reasons), notes=tuple(notes))
