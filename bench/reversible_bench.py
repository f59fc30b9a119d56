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

Every figure is measured (``revify.device_step``): bytes saved for backward
(saved_tensors_hooks, deduplicated by storage, parameters and buffers
excluded), the step's peak (CPU: live tensor bytes; CUDA:
``max_memory_allocated`` above the step's start), and the step time paired with
full fine-tuning (steps alternating, the median of per-pair ratios with its
spread). The reconstruction error is the largest error measured at conversion
over every reversible step (the plan's), with its anchors.

    python bench/reversible_bench.py                       # 12 and 24 layers
    python bench/reversible_bench.py --layers 4 --hidden 256   # quick look
    python bench/reversible_bench.py --device cuda --dtype bf16 --layers 24 --hidden 1024 --batch-size 32
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

import revify
from bench_options import add_step_options, check_device  # bench/ is the script's folder
from gpu_suite import enable_hf_checkpointing
from revify.device_step import measure_step_memory, paired_step_times, precision, with_precision
from revify.report import default_loss_fn, format_bytes

COUPLINGS = ("meft1", "meft2", "meft3")
GOALS = {12: 0.10, 24: 0.06}  # reversible saved bytes as a fraction of full fine-tuning (issue 3)


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
    device = torch.device(args.device)
    base = build(layers, args.hidden, args.seq_len).to(device)
    torch.manual_seed(1)
    inputs = {"input_ids": torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len)).to(device)}
    hf = copy.deepcopy(base)
    enable_hf_checkpointing(hf)
    # converted, profiled and calibrated at the training precision (no weight-cast cache: see
    # revify.device_step.precision)
    with precision(device, args.dtype, cache_enabled=False):
        planner = revify.revify(copy.deepcopy(base), inputs, strategy="checkpoint")
    variants = [("full fine-tuning", base, None), ("HF gradient checkpointing", hf, None),
                ("revify checkpoint (planner)", planner, None)]
    for coupling in COUPLINGS:
        t0 = time.perf_counter()
        with precision(device, args.dtype, cache_enabled=False):
            rmodel = revify.revify(copy.deepcopy(base), inputs, strategy="reversible", coupling=coupling)
        convert_s = time.perf_counter() - t0
        if not rmodel.revify_plan.reversible:
            print(f"  {coupling}: not converted\n{rmodel.revify_plan.summary()}")
            continue
        if coupling == "meft1":
            variants.append(("adapters, stored activations", _Stored(rmodel), rmodel.revify_plan))
        variants.append((f"revify {coupling}", rmodel, (rmodel.revify_plan, convert_s)))
    rows = []
    full_amp = with_precision(base, device, args.dtype)
    for name, model, info in variants:
        amp = with_precision(model, device, args.dtype)  # forward under autocast, backward outside
        mem = measure_step_memory(amp, inputs, default_loss_fn, device)
        # every variant paired with full fine-tuning; /stored divides two such median ratios
        times = paired_step_times(amp, full_amp, inputs, default_loss_fn, pairs=args.pairs, device=device,
                                  clock=args.clock)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append((name, mem, times, info, trainable))
        print(f"  measured {name}", flush=True)
    full = rows[0][1]
    stored = next(t for n, _, t, _, _ in rows if n.startswith("adapters"))
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} CPU threads")
    peak_name = "peak" if device.type != "cuda" else "step peak"
    out = [f"BERT shape: {layers} layers, hidden {args.hidden}, batch {args.batch_size}, seq {args.seq_len}, "
           f"{args.dtype}, {where} — all figures measured",
           f"{'variant':30} {'trainable':>10} {'saved':>10} {'/full':>6} {peak_name:>10} {'/full':>6} "
           f"{'step':>8} {'x full [spread]':>17} {'/stored':>7}  reversible details"]
    for name, m, t, info, trainable in rows:
        detail = ""
        if isinstance(info, tuple):
            plan, convert_s = info
            rp = plan.reversible[0]
            detail = (f"anchors {list(rp.anchors) or '-'}, max recon err {max(rp.step_errors):.1e}, "
                      f"start err {rp.start_error:.3f} (bound {rp.start_bound:.2f}), convert {convert_s:.0f}s")
        lo, hi = t.spread
        out.append(f"{name:30} {trainable / 1e6:9.2f}M {format_bytes(m.saved_bytes):>10} "
                   f"{m.saved_bytes / full.saved_bytes:6.3f} {format_bytes(m.peak.step_peak_bytes):>10} "
                   f"{m.peak.step_peak_bytes / full.peak.step_peak_bytes:6.3f} {t.median_s * 1e3:6.0f}ms "
                   f"{t.ratio:6.2f} [{lo:.2f}-{hi:.2f}] {t.ratio / stored.ratio:7.2f}  {detail}")
    out.append(f"step: median of {args.pairs} steps; x full: median of the ratios of each step to the full "
               "fine-tuning step run beside it (order alternating), [lowest-highest]; /stored: that over "
               "the stored-activation adapters' own median ratio")
    goal = GOALS.get(layers)
    for name, m, t, info, _ in rows:
        if isinstance(info, tuple) and goal is not None:
            frac, slow = m.saved_bytes / full.saved_bytes, t.ratio / stored.ratio
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
    add_step_options(ap, "full fine-tuning")
    args = ap.parse_args()
    check_device(args, "reversible_bench")
    tables = []
    for layers in args.layers:
        tables.append(run_depth(layers, args))
    for table in tables:
        print()
        print("\n".join(table))


if __name__ == "__main__":
    main()
