"""Checkpoint benchmark: revify against the anchors, side by side, in one run.

BERT-base shape by default (12 layers, hidden 768, batch 4, seq 128, fp32,
CPU). Every figure is measured (``revify.device_step``): bytes saved for
backward (saved_tensors_hooks, deduplicated by storage, parameters and buffers
excluded), the step's peak (CPU: live tensor bytes above the step's start; CUDA:
``max_memory_allocated`` less what was allocated at the start, with the
absolute peak and ``max_memory_reserved`` beside it), and the step time paired
with plain training: each variant's steps alternate with plain steps, and the
ratio printed is the median of the per-pair ratios with its spread, so a machine
whose speed drifts over minutes does not read as a slowdown.

    python bench/checkpoint_bench.py                 # BERT-base shape
    python bench/checkpoint_bench.py --layers 4 --hidden 256   # quick look
    python bench/checkpoint_bench.py --device cuda --dtype bf16 --batch-size 32 --seq-len 512
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
from bench_options import add_step_options, check_device  # bench/ is the script's folder
from gpu_suite import enable_hf_checkpointing
from revify.device_step import measure_step_memory, paired_step_times, precision, with_precision
from revify.report import default_loss_fn, format_bytes


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
    add_step_options(ap, "a plain step")
    args = ap.parse_args()
    device = check_device(args, "checkpoint_bench")

    base = build(args.layers, args.hidden, args.seq_len).to(device)
    torch.manual_seed(1)
    # no attention mask: every anchor runs the layers with the same (absent) mask
    inputs = {"input_ids": torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len)).to(device)}

    hf = copy.deepcopy(base)
    enable_hf_checkpointing(hf)
    # the planner measures under the training precision (without autocast's weight-cast cache: it runs
    # many forwards in one region, see revify.device_step.precision)
    with precision(device, args.dtype, cache_enabled=False):
        planner = revify.revify(copy.deepcopy(base), inputs, strategy="checkpoint")
        per_block = revify.revify(copy.deepcopy(base), inputs, strategy="checkpoint", schedule="per-block")
    variants = [
        ("plain training", base),
        ("HF activation_checkpointing_enable", hf),
        ("checkpoint_sequential sqrt(n)", with_checkpoint_sequential(copy.deepcopy(base))),
        # the default planner minimises the peak, then recompute: where parameter gradients set
        # the peak it keeps activations that cost no peak, so it is shown beside per-block
        ("revify planner (default)", planner),
        ("revify checkpoint per-block", per_block),
    ]
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} CPU threads")
    print(f"BERT shape: {args.layers} layers, hidden {args.hidden}, batch {args.batch_size}, "
          f"seq {args.seq_len}, {args.dtype}, {where} — all figures measured")
    rows = []
    plain_amp = with_precision(base, device, args.dtype)
    for name, model in variants:
        amp = with_precision(model, device, args.dtype)  # forward under autocast, backward outside
        mem = measure_step_memory(amp, inputs, default_loss_fn, device)
        times = paired_step_times(amp, plain_amp, inputs, default_loss_fn, pairs=args.pairs, device=device,
                                  clock=args.clock)
        rows.append((name, mem, times))
        print(f"  measured {name}", flush=True)
    plain = rows[0][1]
    peak_name = "peak" if device.type != "cuda" else "step peak"
    print()
    print(f"{'variant':34} {'saved':>11} {'ratio':>7} {peak_name:>11} {'ratio':>7} {'step':>9} "
          f"{'x plain [spread]':>18}" + (f" {'peak alloc':>11} {'reserved':>11}" if device.type == "cuda" else ""))
    for name, m, t in rows:
        lo, hi = t.spread
        line = (f"{name:34} {format_bytes(m.saved_bytes):>11} {m.saved_bytes / plain.saved_bytes:7.3f} "
                f"{format_bytes(m.peak.step_peak_bytes):>11} {m.peak.step_peak_bytes / plain.peak.step_peak_bytes:7.3f} "
                f"{t.median_s * 1e3:7.0f}ms {t.ratio:7.2f} [{lo:.2f}-{hi:.2f}]")
        if device.type == "cuda":
            line += f" {format_bytes(m.peak.peak_bytes):>11} {format_bytes(m.peak.reserved_bytes):>11}"
        print(line)
    clock = "CUDA events" if device.type == "cuda" else {"wall": "wall clock", "cpu": "process CPU time"}[args.clock]
    print(f"step ({clock}): median of {args.pairs} steps; x plain: median of the ratios of each step to the plain step run "
          "beside it (the order alternating), [lowest-highest]; plain's own row is the noise floor")
    _, r, rt = rows[-1]  # per-block: the goal is about bytes saved for backward
    saved_frac = 1 - r.saved_bytes / plain.saved_bytes
    print()
    print(f"revify saves {saved_frac:.1%} of plain saved-activation bytes (goal >= 85%) "
          f"at {rt.ratio:.2f}x plain step time (goal <= 1.4x): "
          f"{'MET' if saved_frac >= 0.85 and rt.ratio <= 1.4 else 'NOT MET'}")
    _, d, dt = rows[-2]
    print(f"revify planner (default): peak {d.peak.step_peak_bytes / r.peak.step_peak_bytes:.3f}x per-block's at "
          f"{dt.ratio / rt.ratio:.2f}x its step time, keeping {d.saved_bytes / plain.saved_bytes:.1%} "
          "of plain saved bytes")
    print(planner.revify_plan.summary())


if __name__ == "__main__":
    main()
