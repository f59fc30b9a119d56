"""Reversible benchmark: MEFT couplings against the anchors, side by side, in one run.

BERT-base shape (hidden 768, batch 4, seq 128, fp32, CPU) at 12 and 24
layers. Variants:

* full fine-tuning: plain training, every parameter trainable;
* HF gradient checkpointing and revify checkpoint: full fine-tuning, recomputed;
* adapters, stored activations: the MEFT1 architecture (same adapters, same
  trainable parameters, backbone frozen) run with ordinary autograd
  (``revify.stored_activations``) — what parameter-efficient fine-tuning
  costs without reversibility;
* revify meft1 / meft2 / meft3: reversible, backbone frozen.

Every figure is measured by ``revify.measure.measure_step``: bytes saved for
backward (saved_tensors_hooks, deduplicated by storage, parameters and
buffers excluded), peak live tensor bytes during forward+backward, median
step time. The reconstruction error is the largest error measured at
conversion over every reversible step (the plan's), with its anchors.

    python bench/reversible_bench.py                       # 12 and 24 layers
    python bench/reversible_bench.py --layers 4 --hidden 256   # quick look
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

import revify
from revify.measure import measure_step
from revify.report import default_loss_fn, format_bytes

COUPLINGS = ("meft1", "meft2", "meft3")
GOALS = {12: 0.10, 24: 0.06}  # reversible saved bytes as a fraction of full fine-tuning (issue 3)


def hf_checkpointing_enable(model) -> None:
    """Transformers' own checkpointing, by the name transformers 5 gives it (the old name warns)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build(layers: int, hidden: int, seq: int) -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                     intermediate_size=4 * hidden, max_position_embeddings=max(512, seq))
    return BertForSequenceClassification(cfg).train()


class _Stored(torch.nn.Module):
    """Calls a converted model with its reversible chains under ordinary autograd.

    A Module, so the measurement sees its parameters and buffers and does not
    count the frozen weights that matmuls save as activations.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        with revify.stored_activations(self.model):
            return self.model(*args, **kwargs)


def run_depth(layers: int, args) -> list[str]:
    base = build(layers, args.hidden, args.seq_len)
    torch.manual_seed(1)
    inputs = {"input_ids": torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len))}
    hf = copy.deepcopy(base)
    hf_checkpointing_enable(hf)
    variants = [("full fine-tuning", base, None), ("HF gradient checkpointing", hf, None),
                ("revify checkpoint (planner)", revify.revify(copy.deepcopy(base), inputs, strategy="checkpoint"), None)]
    for coupling in COUPLINGS:
        t0 = time.perf_counter()
        rmodel = revify.revify(copy.deepcopy(base), inputs, strategy="reversible", coupling=coupling)
        convert_s = time.perf_counter() - t0
        if not rmodel.revify_plan.reversible:
            print(f"  {coupling}: not converted\n{rmodel.revify_plan.summary()}")
            continue
        if coupling == "meft1":
            variants.append(("adapters, stored activations", _Stored(rmodel), rmodel.revify_plan))
        variants.append((f"revify {coupling}", rmodel, (rmodel.revify_plan, convert_s)))
    rows = []
    for name, model, info in variants:
        m = measure_step(model, inputs, default_loss_fn, repeats=args.repeats)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append((name, m, info, trainable))
        print(f"  measured {name}", flush=True)
    full = rows[0][1]
    stored = next(m for n, m, _, _ in rows if n.startswith("adapters"))
    out = [f"BERT shape: {layers} layers, hidden {args.hidden}, batch {args.batch_size}, seq {args.seq_len}, fp32, "
           f"{torch.get_num_threads()} CPU threads — all figures measured",
           f"{'variant':30} {'trainable':>10} {'saved':>10} {'/full':>6} {'peak':>10} {'/full':>6} "
           f"{'step':>8} {'/stored':>7}  reversible details"]
    for name, m, info, trainable in rows:
        detail = ""
        if isinstance(info, tuple):
            plan, convert_s = info
            rp = plan.reversible[0]
            detail = (f"anchors {list(rp.anchors) or '-'}, max recon err {max(rp.step_errors):.1e}, "
                      f"start err {rp.start_error:.3f} (bound {rp.start_bound:.2f}), convert {convert_s:.0f}s")
        out.append(f"{name:30} {trainable / 1e6:9.2f}M {format_bytes(m.saved_bytes):>10} "
                   f"{m.saved_bytes / full.saved_bytes:6.3f} {format_bytes(m.peak_bytes):>10} "
                   f"{m.peak_bytes / full.peak_bytes:6.3f} {m.step_time_s * 1e3:6.0f}ms "
                   f"{m.step_time_s / stored.step_time_s:7.2f}  {detail}")
    goal = GOALS.get(layers)
    for name, m, info, _ in rows:
        if isinstance(info, tuple) and goal is not None:
            frac, slow = m.saved_bytes / full.saved_bytes, m.step_time_s / stored.step_time_s
            met = frac <= goal and slow <= 1.5
            out.append(f"{name}: saved {frac:.1%} of full fine-tuning (goal <= {goal:.0%}), step "
                       f"{slow:.2f}x adapters with stored activations (goal <= 1.5x): {'MET' if met else 'NOT MET'}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[12, 24])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tables = []
    for layers in args.layers:
        tables.append(run_depth(layers, args))
    for table in tables:
        print()
        print("\n".join(table))


if __name__ == "__main__":
    main()
