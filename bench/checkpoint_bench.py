"""Checkpoint benchmark: revify against the anchors, side by side, in one run.

BERT-base shape by default (12 layers, hidden 768, batch 4, seq 128, fp32,
CPU). Every figure is measured by ``revify.measure.measure_step``: bytes saved
for backward (saved_tensors_hooks, deduplicated by storage, parameters and
buffers excluded), peak live tensor bytes during forward+backward, and the
median step time. Ratios are to plain training.

    python bench/checkpoint_bench.py                 # BERT-base shape
    python bench/checkpoint_bench.py --layers 4 --hidden 256   # quick look
"""
from __future__ import annotations

import argparse
import copy
import math

import torch
from torch.utils.checkpoint import checkpoint_sequential
from transformers import BertConfig, BertForSequenceClassification
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

import revify
from revify.measure import measure_step
from revify.report import default_loss_fn, format_bytes


def hf_checkpointing_enable(model) -> None:
    """Transformers' own checkpointing, by the name transformers 5 gives it (the old name warns)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build(layers: int, hidden: int, seq: int):
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                     intermediate_size=4 * hidden, max_position_embeddings=max(512, seq))
    return BertForSequenceClassification(cfg).train()


def with_checkpoint_sequential(model):
    """What a user writes by hand: checkpoint_sequential over the encoder layers, sqrt(n) segments."""
    encoder = model.bert.encoder
    segments = max(1, round(math.sqrt(len(encoder.layer))))

    def forward(hidden_states, *args, **kwargs):
        out = checkpoint_sequential(list(encoder.layer), segments, hidden_states, use_reentrant=False)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=out)

    encoder.forward = forward
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    base = build(args.layers, args.hidden, args.seq_len)
    torch.manual_seed(1)
    # no attention mask: every anchor runs the layers with the same (absent) mask
    inputs = {"input_ids": torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len))}

    hf = copy.deepcopy(base)
    hf_checkpointing_enable(hf)
    variants = [
        ("plain training", base),
        ("HF activation_checkpointing_enable", hf),
        ("checkpoint_sequential sqrt(n)", with_checkpoint_sequential(copy.deepcopy(base))),
        # the default planner minimises the peak, then recompute: where parameter gradients set
        # the peak it keeps activations that cost no peak, so it is shown beside per-block
        ("revify planner (default)", revify.revify(copy.deepcopy(base), inputs, strategy="checkpoint")),
        ("revify checkpoint per-block", revify.revify(copy.deepcopy(base), inputs, strategy="checkpoint",
                                                      schedule="per-block")),
    ]
    print(f"BERT shape: {args.layers} layers, hidden {args.hidden}, batch {args.batch_size}, "
          f"seq {args.seq_len}, fp32, {torch.get_num_threads()} CPU threads — all figures measured")
    rows = []
    for name, model in variants:
        m = measure_step(model, inputs, default_loss_fn, repeats=args.repeats)
        rows.append((name, m))
        print(f"  measured {name}", flush=True)
    plain = rows[0][1]
    print()
    print(f"{'variant':34} {'saved':>11} {'ratio':>7} {'peak':>11} {'ratio':>7} {'step':>9} {'ratio':>7}")
    for name, m in rows:
        print(f"{name:34} {format_bytes(m.saved_bytes):>11} {m.saved_bytes / plain.saved_bytes:7.3f} "
              f"{format_bytes(m.peak_bytes):>11} {m.peak_bytes / plain.peak_bytes:7.3f} "
              f"{m.step_time_s * 1e3:7.0f}ms {m.step_time_s / plain.step_time_s:7.2f}")
    r = rows[-1][1]  # per-block: the goal is about bytes saved for backward
    saved_frac = 1 - r.saved_bytes / plain.saved_bytes
    slowdown = r.step_time_s / plain.step_time_s
    print()
    print(f"revify saves {saved_frac:.1%} of plain saved-activation bytes (goal >= 85%) "
          f"at {slowdown:.2f}x plain step time (goal <= 1.4x): "
          f"{'MET' if saved_frac >= 0.85 and slowdown <= 1.4 else 'NOT MET'}")
    d = rows[-2][1]
    print(f"revify planner (default): peak {d.peak_bytes / r.peak_bytes:.3f}x per-block's at "
          f"{d.step_time_s / r.step_time_s:.2f}x its step time, keeping {d.saved_bytes / plain.saved_bytes:.1%} "
          "of plain saved bytes")
    print(variants[-2][1].revify_plan.summary())


if __name__ == "__main__":
    main()
