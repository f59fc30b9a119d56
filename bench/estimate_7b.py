"""Memory of a Llama-2-7B-shaped model at sequence length 4096, estimated without allocating it.

Part 1 builds the model under ``FakeTensorMode`` and runs ``revify.estimate.estimate``:
revify's own pipeline (record, capture, find chains, plan, rewrite) and one training step of the
original and of the per-block checkpointed model on fake tensors. It prints the report, the wall
time and the process's peak RSS (goal: under 60 s and 2 GiB on 2 CPU cores).

Part 2 checks those figures against MEASURED runs: the same code on real tensors for a family of
scaled-down configs with the same depth (32 layers) and the 7B shape scaled by ``w`` (hidden 128·w,
intermediate 344·w, w heads of 128, vocabulary 1000·w; w = 32 is Llama-2-7B), at short sequences.
``revify.estimate.fit_scaled`` fits exact polynomials in (w, S) to those measurements; evaluated at
w = 32, S = 4096 they must agree with part 1 within 5%.

    python bench/estimate_7b.py                 # both parts (part 2: 11 real 32-layer runs, 1-6 minutes)
    python bench/estimate_7b.py --skip-scaled   # part 1 only

The inputs are token ids without an attention mask. On fake tensors transformers would build the causal
mask that a real run leaves to SDPA's ``is_causal`` (it cannot read the position ids);
``revify/passes/prediction/fake_transformers.py`` makes it take the real run's path, so both parts agree exactly.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from revify.estimate import estimate, fit_scaled
from revify.units import format_bytes


def llama(w: int, layers: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=128 * w, intermediate_size=344 * w, num_hidden_layers=layers,
                      num_attention_heads=w, num_key_value_heads=w, vocab_size=1000 * w, use_cache=False)
    return LlamaForCausalLM(cfg).train()


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--skip-scaled", action="store_true", help="part 1 only")
    p.add_argument("--device", default="cpu",
                   help="part 1: the device whose kernels are faked (cpu, or cuda: e.g. SDPA's CUDA kernels save "
                        "other tensors); part 2 always measures on CPU. Nothing is timed: fp32, no step ratios")
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    w, seq = 32, args.seq_len
    print(f"part 1: Llama-2-7B shape (hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000), "
          f"batch 1, seq {seq}, fp32, per-block checkpoint; fake tensors ({args.device} kernels)", flush=True)
    t0 = time.perf_counter()
    ids = torch.empty(1, seq, dtype=torch.long, device="meta")
    rep = estimate(lambda: llama(w), {"input_ids": ids}, "checkpoint", schedule="per-block", formulas=False,
                   device=args.device)
    elapsed, rss = time.perf_counter() - t0, rss_gib()
    print(rep)
    ok_time, ok_rss = elapsed < 60, rss < 2
    print(f"part 1: {elapsed:.1f} s wall, peak RSS {rss:.2f} GiB "
          f"({'PASS' if ok_time and ok_rss else 'FAIL'}: goal < 60 s and < 2 GiB)", flush=True)
    if args.skip_scaled:
        return 0 if ok_time and ok_rss else 1

    print("part 2: exact formulas in (w, S) fitted on MEASURED steps (real tensors) of 32-layer configs "
          "with w in 2..6 and S in 16..80, evaluated at w = 32, S = 4096", flush=True)
    t0 = time.perf_counter()

    def build(v):
        torch.manual_seed(0)
        return llama(v["w"]), {"input_ids": torch.randint(0, 1000 * v["w"], (1, v["S"]))}

    formulas = fit_scaled(build, {"w": [2, 3, 4, 5, 6, 7], "S": [16, 32, 48, 64, 80, 96]}, guess={"w": 2, "S": 2})
    print(f"part 2: fitted on {len(formulas['before'].fit_points)} measured configs in "
          f"{time.perf_counter() - t0:.1f} s")
    worst = 0.0
    print(f"  {'':24} {'estimated (7B, fake)':>22} {'formula (scaled)':>18} {'diff':>7}")
    for which, m in (("before", rep.before), ("after", rep.after)):
        f = formulas[which]
        print(f"  {which}: saved = {f.describe()[0].split('= ', 1)[1]}")
        pred = f.evaluate(w=w, S=seq)
        rows = [("saved for backward", m.saved_bytes, pred["saved"]), ("peak above parameters", m.peak_bytes,
                pred["peak"]), ("parameters + buffers", m.param_bytes, pred["params"])]
        rows += [(f"  {c} at peak", m.peak_by_category[c], pred["peak_by_category"][c]) for c in m.peak_by_category]
        for name, est, fit in rows:
            diff = abs(est - fit) / max(est, 1)
            if not name.startswith("  "):
                worst = max(worst, diff)
            print(f"  {which + ' ' + name:24} {format_bytes(est):>22} {format_bytes(fit):>18} {diff:7.2%}")
    ok = worst <= 0.05
    print(f"part 2: largest difference in saved, peak and parameters {worst:.2%} ({'PASS' if ok else 'FAIL'}: "
          "goal within 5%)")
    return 0 if ok_time and ok_rss and ok else 1


if __name__ == "__main__":
    sys.exit(main())
