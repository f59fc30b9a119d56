"""GPU suite: revify against the anchors on a BERT-large and a Llama-1B shape, in one run, on one GPU.

Shapes (bf16 autocast, fp32 weights, as mixed-precision training runs them):

* ``bert``: BERT-large (24 layers, hidden 1024, 16 heads), batch 32, seq 512,
  sequence classification with labels;
* ``llama``: Llama-3.2-1B-like (16 layers, hidden 2048, 32 heads, 8 KV heads
  (GQA), FFN 8192, vocab 128256, tied embeddings), seq 2048, causal LM loss
  with labels, ``use_cache=False`` (training); the batch is the largest whose
  plain training step's ``max_memory_allocated`` stays within 40 GB, fitted
  from two measured steps at batch 1 and 2 (``--llama-batch`` fixes it).

Rows (``--only`` takes their ids), each measured against plain training:

    plain         plain training (its paired ratio to itself is the noise floor)
    hf            Hugging Face checkpointing (activation_checkpointing_enable, else
                  gradient_checkpointing_enable, non-reentrant)
    perblock      revify, schedule="per-block"
    budget-min    revify planner, peak budget = the smallest it accepts
    budget-hf     revify planner, peak budget = HF checkpointing's measured step peak
    budget-mid    revify planner, peak budget = halfway between HF's and plain's step peak
    flops         revify planner at budget-hf's budget, recompute_cost="flops"
    stored        MEFT1's architecture (adapters, frozen backbone) under revify.stored_activations
    meft1, meft3  revify strategy="reversible", frozen backbone (also as ratios to "stored")
    compile       torch.compile (activation_memory_budget 1.0: the compiler's default plan)
    compile-0.5   torch.compile with activation_memory_budget 0.5
    perblock+compile  torch.compile of revify per-block (revify's chains run eager under dynamo;
                  also as a ratio to "compile")

Every eager row of every model runs before any compile row, so a run cut by the
time limit still has the eager table. The planner rows share one profile
(revify's own passes: profile once, solve per budget, which is what
``revify(memory_budget=...)`` runs).

Columns: peak = ``torch.cuda.max_memory_allocated`` over one step after
``reset_peak_memory_stats`` (everything resident, i.e. the model's weights and
any copy this suite holds), reserved = ``max_memory_reserved``, step peak =
peak minus the bytes allocated when the step started (what the planner
predicts; ratios are of step peaks), saved = bytes saved for backward
(``revify.measure``'s saved-tensor hooks, deduplicated by storage, parameters
excluded; not measured on compile rows by default: hooks make dynamo compile
again), step = median of paired steps (CUDA events, ``--pairs`` pairs, variant
and plain alternating, after warm-up) with the median ratio to plain and its
spread, tokens/s, pred = the planner's predicted step peak and its error against
the measured step peak.

On CPU (``--quick``: tiny shapes, bf16 autocast, compile with the aot_eager
backend, whose partitioner applies the same budget) the peak is the live-tensor
tracker's and reserved is n/a.

    python bench/gpu_suite.py                        # the GPU run: results/gpu-<date>.json and .md
    python bench/gpu_suite.py --only plain hf budget-hf --models bert
    python bench/gpu_suite.py --quick                # tiny, CPU, < 2 minutes
    python bench/gpu_suite.py --quick --device cuda  # tiny, on the GPU: a smoke run of the CUDA paths
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import revify
from revify.api import analyse_model
from revify.device_step import (PairedTimes, measure_peak, paired_step_times, precision, to_device, train_step,
                                 with_precision)
from revify.measure import measure_saved_bytes, parameter_bytes
from revify.passes.planning.plan_budget import build_problem, checkpoint_plans, schedule_path
from revify.passes.planning.plan_checkpoint import plan_checkpoint
from revify.passes.planning.profile_blocks import profile_chains
from revify.passes.planning.profile_step import profile_step
from revify.passes.rewrite.rewrite_checkpoint import rewrite_checkpoint
from revify.passes.planning.solve_schedule import min_budget, path_peak, solve_within
from revify.units import format_bytes

EAGER_ROWS = ("plain", "hf", "perblock", "budget-min", "budget-hf", "budget-mid", "flops", "stored", "meft1", "meft3")
COMPILE_ROWS = ("compile", "compile-0.5", "perblock+compile")
ROWS = EAGER_ROWS + COMPILE_ROWS
MODELS = ("bert", "llama")
LABELS = {
    "plain": "plain training", "hf": "HF gradient checkpointing", "perblock": "revify per-block",
    "budget-min": "revify planner, smallest peak", "budget-hf": "revify planner, HF's peak",
    "budget-mid": "revify planner, mid peak", "flops": "revify planner, HF's peak, flops",
    "stored": "adapters, stored activations", "meft1": "revify meft1", "meft3": "revify meft3",
    "compile": "torch.compile", "compile-0.5": "torch.compile budget 0.5",
    "perblock+compile": "revify per-block + torch.compile",
}
PLAIN_LIMIT = 40e9  # bytes: the Llama batch is the largest whose plain step stays within 40 GB


def enable_hf_checkpointing(model: torch.nn.Module) -> str:
    """Hugging Face's own checkpointing, as a user turns it on; returns the call made.

    transformers 5 deprecates ``gradient_checkpointing_enable`` for ``activation_checkpointing_enable``
    (5.25 has it, 5.17 does not); both checkpoint each layer, non-reentrant here.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return "activation_checkpointing_enable(use_reentrant=False)"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return "gradient_checkpointing_enable(use_reentrant=False)"


def _loss(out: Any) -> torch.Tensor:
    return out.loss  # the models compute their own task loss from the labels in the inputs


@dataclass
class Workload:
    name: str
    desc: str
    model: torch.nn.Module
    inputs: dict
    tokens: int
    make_inputs: Callable[[int], dict]
    batch: int
    # filled while the rows run: the planner's profile, rows other rows need
    planner: Any = None
    perblock: Any = None
    step_peaks: dict[str, int] = field(default_factory=dict)


def _bert(quick: bool, device: torch.device, batch: int | None, seq: int | None) -> Workload:
    from transformers import BertConfig, BertForSequenceClassification
    layers, hidden, default_seq = (2, 64, 32) if quick else (24, 1024, 512)
    seq = seq or default_seq
    batch = batch or (2 if quick else 32)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                     intermediate_size=4 * hidden, vocab_size=512 if quick else 30522)
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the GPU: 0.3-1.2 B parameters on CPU take long
        model = BertForSequenceClassification(cfg).train()

    def make(b: int) -> dict:
        g = torch.Generator().manual_seed(1)
        return to_device({"input_ids": torch.randint(0, cfg.vocab_size, (b, seq), generator=g),
                          "labels": torch.randint(0, cfg.num_labels, (b,), generator=g)}, device)

    return Workload("bert", f"BERT-large shape: {layers} x {hidden}, batch {batch}, seq {seq}", model, make(batch),
                    batch * seq, make, batch)


def _llama(quick: bool, device: torch.device, batch: int | None, seq: int | None, dtype: str,
           log: Callable[[str], None]) -> Workload:
    from transformers import LlamaConfig, LlamaForCausalLM
    if quick:
        dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256)
        default_seq = 32
    else:  # Llama 3.2 1B's shape
        dims = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True)
        default_seq = 2048
    seq = seq or default_seq
    cfg = LlamaConfig(**dims, max_position_embeddings=seq, use_cache=False)  # training: no KV cache
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).train()

    def make(b: int) -> dict:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (b, seq), generator=g)
        return to_device({"input_ids": ids, "labels": ids.clone()}, device)

    if batch is None:
        batch = 2 if quick or device.type != "cuda" else _fit_batch(with_precision(model, device, dtype), make, log)
    n = model.config.num_hidden_layers
    return Workload("llama", f"Llama-1B shape: {n} layers, hidden {dims['hidden_size']}, GQA "
                    f"{dims['num_attention_heads']}/{dims['num_key_value_heads']}, batch {batch}, seq {seq}",
                    model, make(batch), batch * seq, make, batch)


def _fit_batch(model: torch.nn.Module, make: Callable[[int], dict], log: Callable[[str], None]) -> int:
    """The largest batch whose plain step peaks within PLAIN_LIMIT: the model's own weights plus the step's
    peak above them, linear in the batch (fitted at 1 and 2), so that whatever else the suite holds on the
    GPU (BERT's rows) does not shrink it."""
    one, two = make(1), make(2)
    train_step(model, one, _loss)  # warm-up: cuBLAS workspaces, kernels
    weights = parameter_bytes(model)
    p1 = weights + measure_peak(model, one, _loss).step_peak_bytes
    p2 = weights + measure_peak(model, two, _loss).step_peak_bytes
    per = max(1, p2 - p1)
    batch = max(1, min(64, 1 + int((PLAIN_LIMIT - p1) // per)))
    log(f"  llama batch: weights + plain step peak {format_bytes(p1)} at batch 1, {format_bytes(p2)} at 2 "
        f"-> batch {batch} (predicted {format_bytes(p1 + (batch - 1) * per)}, limit {PLAIN_LIMIT / 1e9:.0f} GB)")
    return batch


@dataclass
class Row:
    model: str
    row: str
    label: str
    status: str = "ok"
    error: str | None = None
    peak: int | None = None
    reserved: int | None = None
    resident: int | None = None
    step_peak: int | None = None
    saved: int | None = None
    step_ms: float | None = None
    ratio: float | None = None
    spread: tuple[float, float] | None = None
    ratios: list[float] | None = None
    tokens_per_s: float | None = None
    predicted: int | None = None
    pred_error: float | None = None
    vs: dict[str, float] = field(default_factory=dict)  # ratio to another row ("stored", "compile")
    setup_s: float | None = None
    measure_s: float | None = None
    note: str = ""


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.rows: list[Row] = []
        self.workloads: dict[str, Workload] = {}
        self.described: dict[str, tuple[str, int, int]] = {}  # name -> (desc, tokens, batch), kept after release
        self.t0 = time.perf_counter()
        self.env = {"torch": torch.__version__, "device": self._device_name(), "dtype": args.dtype,
                    "pairs": args.pairs, "quick": args.quick, "date": dt.datetime.now(dt.timezone.utc).isoformat()}
        try:
            import transformers
            self.env["transformers"] = transformers.__version__
        except ImportError:
            pass

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"cpu, {torch.get_num_threads()} threads"

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)

    # ---- workloads -----------------------------------------------------------------------------------------
    def workload(self, name: str) -> Workload:
        if name not in self.workloads:
            t = time.perf_counter()
            if name == "bert":
                w = _bert(self.args.quick, self.device, self.args.bert_batch, self.args.bert_seq)
            else:
                w = _llama(self.args.quick, self.device, self.args.llama_batch, self.args.llama_seq,
                           self.args.dtype, self.log)
            self.workloads[name] = w
            self.described[name] = w.desc, w.tokens, w.batch
            self.log(f"{w.desc}: built in {time.perf_counter() - t:.1f} s, "
                     f"{sum(p.numel() for p in w.model.parameters()) / 1e6:.0f}M parameters")
        return self.workloads[name]

    def planner(self, w: Workload) -> Any:
        """Profile once (revify's passes, as ``revify(memory_budget=...)`` runs them); problems per unit."""
        if w.planner is None:
            t = time.perf_counter()
            # the planner measures under the training precision; no autocast weight cache: it runs many
            # forwards and backwards in one region (see revify.device_step.precision)
            with precision(self.device, self.args.dtype, cache_enabled=False):
                _, _, analysis = analyse_model(w.model, w.inputs, "checkpoint")
                chains = list(analysis.chains)
                profiles = profile_chains(w.model, chains)
                reference, _ = rewrite_checkpoint(w.model, [plan_checkpoint(c, "per-block") for c in chains])
                step = profile_step(reference, chains, w.inputs, _loss)
            problems = {u: build_problem(profiles, step, budget_for="peak", recompute_cost=u) for u in ("time", "flops")}
            w.planner = (chains, profiles, problems)
            self.log(f"  planner profile of {w.name}: {time.perf_counter() - t:.1f} s")
        return w.planner

    def release(self, name: str) -> None:
        """Drop a model and everything built on it after its eager rows, so the next model's absolute peaks
        hold its own weights only; compile rows build it again (same seed, same batch)."""
        w = self.workloads.pop(name, None)
        if w is None:
            return
        setattr(self.args, f"{name}_batch", w.batch)
        del w
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- rows ----------------------------------------------------------------------------------------------
    def build_row(self, w: Workload, row: str, out: Row) -> tuple[Any, Any, dict]:
        """(model to measure, its paired baseline, ratios to compute against other rows)"""
        dtype = self.args.dtype
        if row == "plain":
            return w.model, w.model, {}
        if row == "hf":
            m = copy.deepcopy(w.model)
            out.note = enable_hf_checkpointing(m)
            return m, w.model, {}
        if row == "perblock":
            _, profiles, problems = self.planner(w)
            plans = [plan_checkpoint(p.chain, "per-block") for p in profiles]
            m, _ = rewrite_checkpoint(w.model, plans)
            out.predicted = path_peak(problems["time"], schedule_path(problems["time"], plans))[0]
            w.perblock = m
            return m, w.model, {}
        if row.startswith("budget-") or row == "flops":
            _, profiles, problems = self.planner(w)
            unit = "flops" if row == "flops" else "time"
            problem = problems[unit]
            smallest = min_budget(problem)[0]
            plain, hf = w.step_peaks.get("plain"), w.step_peaks.get("hf")
            if row == "budget-min":
                budget = smallest
            elif hf is None or plain is None:
                raise RuntimeError("needs the plain and hf rows' step peaks (run them first)")
            elif row in ("budget-hf", "flops"):
                budget = max(smallest, hf)
            else:
                budget = max(smallest, (hf + plain) // 2)
            sol = solve_within(problem, budget)
            if sol is None:
                raise RuntimeError(f"no plan within {format_bytes(budget)} (smallest {format_bytes(smallest)})")
            plans = checkpoint_plans(sol, profiles)
            m, _ = rewrite_checkpoint(w.model, plans)
            out.predicted = sol.peak
            segs = [s.describe() for cp in plans for s in cp.segments]
            stems = [cp.stem for cp in plans if cp.stem]
            out.note = f"budget {format_bytes(budget)}; segments {segs}" + (f"; stems {stems}" if stems else "")
            return m, w.model, {}
        if row in ("stored", "meft1", "meft3"):
            coupling = "meft1" if row == "stored" else row
            key = f"_rev_{coupling}"
            if not hasattr(w, key):
                base = copy.deepcopy(w.model)  # freeze_backbone freezes the parameters it shares
                t = time.perf_counter()
                rmodel = revify.revify(base, w.inputs, strategy="reversible", coupling=coupling, loss_fn=_loss)
                if not rmodel.revify_plan.reversible:
                    raise RuntimeError("not converted: " + rmodel.revify_plan.summary().replace("\n", " | ")[:400])
                rp = rmodel.revify_plan.reversible[0]
                setattr(w, key, (rmodel, f"anchors {list(rp.anchors) or '-'}, convert {time.perf_counter() - t:.0f} s"))
            rmodel, info = getattr(w, key)
            if row == "stored":
                return _Stored(rmodel), w.model, {}
            out.note = info
            return rmodel, w.model, {"stored": 1.0}
        if row in COMPILE_ROWS:
            import torch._functorch.config as functorch_config
            torch._dynamo.reset()
            target = w.model
            if row == "perblock+compile":
                if w.perblock is None:  # the perblock row did not run: the same rewrite, without profiling
                    w.perblock = revify.revify(w.model, w.inputs, schedule="per-block", strict=True)
                target = w.perblock
            backend = self.args.compile_backend or ("inductor" if self.device.type == "cuda" else "aot_eager")
            budget = 0.5 if row == "compile-0.5" else 1.0
            compiled = torch.compile(target, backend=backend)
            t = time.perf_counter()
            with functorch_config.patch(activation_memory_budget=budget):
                train_step(with_precision(compiled, self.device, dtype), w.inputs, _loss)  # compiles forward and backward under the budget
            out.note = f"{backend}, activation_memory_budget {budget}, compiled in {time.perf_counter() - t:.0f} s"
            return compiled, w.model, ({"compile": 1.0} if row == "perblock+compile" else {})
        raise ValueError(row)

    def run_row(self, name: str, row: str) -> None:
        out = Row(name, row, LABELS[row])
        self.rows.append(out)
        if self.args.time_limit and time.perf_counter() - self.t0 > self.args.time_limit:
            out.status, out.error = "skipped", f"time limit {self.args.time_limit:.0f} s reached"
            self.log(f"{name} {row}: skipped (time limit)")
            return
        try:
            w = self.workload(name)
            t = time.perf_counter()
            with precision(self.device, self.args.dtype, cache_enabled=False):  # conversion, calibration
                model, base, vs = self.build_row(w, row, out)
            out.setup_s = time.perf_counter() - t
            t = time.perf_counter()
            self.measure(w, row, model, base, out)
            for other in vs:
                ref = next((r for r in self.rows if r.model == name and r.row == other and r.ratio), None)
                if ref is not None:
                    out.vs[other] = out.ratio / ref.ratio
            out.measure_s = time.perf_counter() - t
            self.log(f"{name} {row}: {self.line(out)}  (setup {out.setup_s:.1f} s, measure {out.measure_s:.1f} s)")
        except Exception as exc:  # a failing row is recorded; the suite goes on
            out.status = "error"
            out.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
            self.log(f"{name} {row}: ERROR {out.error}")
            traceback.print_exc(limit=6)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.write()

    def measure(self, w: Workload, row: str, model: Any, base: Any, out: Row) -> None:
        model, base = (with_precision(m, self.device, self.args.dtype) for m in (model, base))
        # forward under autocast, backward outside (PyTorch's AMP recipe)
        train_step(model, w.inputs, _loss)  # warm-up: workspaces, reversible anchors for bf16, compile
        mem = measure_peak(model, w.inputs, _loss, self.device)
        out.peak, out.reserved, out.resident, out.step_peak = (mem.peak_bytes, mem.reserved_bytes,
                                                               mem.resident_bytes, mem.step_peak_bytes)
        w.step_peaks[row] = mem.step_peak_bytes
        if row not in COMPILE_ROWS or self.args.compile_saved:
            out.saved = measure_saved_bytes(model, w.inputs, _loss)[0]
        times: PairedTimes = paired_step_times(model, base, w.inputs, _loss, pairs=self.args.pairs,
                                               warmup=self.args.warmup, device=self.device)
        out.step_ms = times.median_s * 1e3
        out.ratio, out.spread, out.ratios = times.ratio, times.spread, [round(r, 4) for r in times.ratios]
        out.tokens_per_s = w.tokens / times.median_s
        if out.predicted is not None:
            out.pred_error = (out.predicted - mem.step_peak_bytes) / mem.step_peak_bytes

    # ---- output --------------------------------------------------------------------------------------------
    def line(self, r: Row) -> str:
        def b(x):
            return format_bytes(x) if x is not None else "n/a"
        spread = f"[{r.spread[0]:.2f}-{r.spread[1]:.2f}]" if r.spread else ""
        plain = next((p for p in self.rows if p.model == r.model and p.row == "plain" and p.step_peak), None)
        rel = f"{r.step_peak / plain.step_peak:.3f}" if plain and r.step_peak is not None else "n/a"
        return (f"peak {b(r.peak)} reserved {b(r.reserved)} step peak {b(r.step_peak)} (x{rel}) saved {b(r.saved)} "
                f"step {r.step_ms:.1f} ms x{r.ratio:.2f} {spread} {r.tokens_per_s:.0f} tok/s pred {b(r.predicted)} "
                f"err {'n/a' if r.pred_error is None else f'{r.pred_error:+.1%}'}")

    def table(self) -> list[str]:
        out = [f"GPU suite — {self.env['device']}, torch {self.env['torch']}, transformers "
               f"{self.env.get('transformers', '-')}, {self.args.dtype} autocast, {self.args.pairs} pairs, "
               f"{self.env['date'][:16]}Z" + (" — QUICK (tiny shapes, CPU)" if self.args.quick else ""), ""]
        for name, (desc, tokens, _) in self.described.items():
            out += [f"**{desc}** ({tokens} tokens/step)", "",
                    "| row | variant | peak | reserved | step peak | /plain | saved | /plain | step ms | x plain "
                    "[spread] | tokens/s | pred peak | pred err | vs | notes |",
                    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            rows = [r for r in self.rows if r.model == name]
            plain = next((r for r in rows if r.row == "plain" and r.status == "ok"), None)
            for r in rows:
                if r.status != "ok":
                    out.append(f"| {r.row} | {r.label} | {r.status}: {r.error} |" + " |" * 12)
                    continue

                def rel(x, y):
                    return f"{x / y:.3f}" if x is not None and y else "n/a"

                def b(x):
                    return format_bytes(x) if x is not None else "n/a"
                vs = ", ".join(f"{v:.2f}x {k}" for k, v in r.vs.items()) or "-"
                out.append(f"| {r.row} | {r.label} | {b(r.peak)} | {b(r.reserved)} | {b(r.step_peak)} | "
                           f"{rel(r.step_peak, plain and plain.step_peak)} | {b(r.saved)} | "
                           f"{rel(r.saved, plain and plain.saved)} | {r.step_ms:.1f} | {r.ratio:.2f} "
                           f"[{r.spread[0]:.2f}-{r.spread[1]:.2f}] | {r.tokens_per_s:.0f} | {b(r.predicted)} | "
                           f"{'-' if r.pred_error is None else f'{r.pred_error:+.1%}'} | {vs} | {r.note} |")
            out.append("")
        out += self.goals()
        return out

    def goals(self) -> list[str]:
        """The issue's goals, met or missed, from the rows measured."""
        lines = []
        for name in self.described:
            get = {r.row: r for r in self.rows if r.model == name and r.status == "ok"}
            if "budget-hf" in get:
                r = get["budget-hf"]
                hf = get.get("hf")
                lines.append(f"- {name}: revify at HF's peak steps {r.ratio:.2f}x plain (goal <= 1.10x"
                             f"{f'; HF {hf.ratio:.2f}x' if hf else ''}): {'MET' if r.ratio <= 1.10 else 'MISSED'}")
            if "meft1" in get and "plain" in get and get["plain"].step_peak:
                f = get["meft1"].step_peak / get["plain"].step_peak
                lines.append(f"- {name}: meft1 step peak {f:.3f}x full fine-tuning (goal <= 0.35x on BERT-large): "
                             f"{'MET' if f <= 0.35 else 'MISSED'}")
            errs = [(k, r.pred_error) for k, r in get.items() if r.pred_error is not None]
            if errs:
                worst = max(errs, key=lambda e: abs(e[1]))
                lines.append(f"- {name}: planner predictions within 10% of the measured step peak at "
                             f"{sum(abs(e) <= 0.10 for _, e in errs)} of {len(errs)} rows (worst {worst[0]} "
                             f"{worst[1]:+.1%})")
        return lines

    def write(self) -> None:
        os.makedirs(self.args.out, exist_ok=True)
        stem = os.path.join(self.args.out, f"gpu-{dt.date.today().isoformat()}" + ("-quick" if self.args.quick else ""))
        data = {"env": self.env, "workloads": {n: {"desc": d, "tokens": t, "batch": b}
                                               for n, (d, t, b) in self.described.items()},
                "rows": [r.__dict__ for r in self.rows], "elapsed_s": time.perf_counter() - self.t0}
        with open(stem + ".json", "w") as f:
            json.dump(data, f, indent=1, default=str)
        with open(stem + ".md", "w") as f:
            f.write("\n".join(self.table()) + "\n")


class _Stored(torch.nn.Module):
    """A reversible model run with ordinary autograd: MEFT's architecture at adapters' memory cost."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with revify.stored_activations(self.model):
            return self.model(*args, **kwargs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The suite's flags with their defaults applied (``--quick``: CPU, at most 2 pairs; else CUDA where
    there is one); ``bench/peak_timeline.py`` builds its suite with them too."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--only", nargs="+", choices=ROWS, help="rows to run (plain always runs: every ratio needs it)")
    ap.add_argument("--skip", nargs="+", choices=ROWS, default=[], help="rows not to run")
    ap.add_argument("--device", help="default: cuda where there is one, else cpu; --quick: cpu unless given")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16")
    ap.add_argument("--pairs", type=int, default=5, help="paired steps (variant, plain) per row")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps of each before the pairs")
    ap.add_argument("--bert-batch", type=int)
    ap.add_argument("--bert-seq", type=int)
    ap.add_argument("--llama-seq", type=int)
    ap.add_argument("--llama-batch", type=int, help="default: the largest within 40 GB for plain training")
    ap.add_argument("--compile-saved", action="store_true", help="also count saved bytes on compile rows")
    ap.add_argument("--compile-backend", choices=["inductor", "aot_eager"],
                    help="default: inductor on CUDA, aot_eager on CPU (same partitioner and activation budget, "
                         "no code generation: compiles in seconds, runs eager kernels)")
    ap.add_argument("--time-limit", type=float, default=0, help="seconds; rows after it are recorded as skipped")
    ap.add_argument("--out", default=os.environ.get("OUT") or "results")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on CPU: the same code in seconds")
    args = ap.parse_args(argv)
    if args.quick:  # tiny shapes; with --device cuda a smoke run of the CUDA paths (compile uses inductor there)
        args.device, args.pairs = args.device or "cpu", min(args.pairs, 2)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; use --quick (CPU) or --device cpu", file=sys.stderr)
        return 2
    rows = [r for r in (args.only or ROWS) if r not in args.skip]
    if "plain" not in rows:
        rows.insert(0, "plain")
    suite = Suite(args)
    suite.log(f"gpu suite: models {args.models}, rows {rows}, device {suite.env['device']}, {args.dtype}")
    for name in args.models:  # eager rows of every model first: a time-out still leaves their table
        for row in (r for r in EAGER_ROWS if r in rows):
            suite.run_row(name, row)
        suite.release(name)
    for name in args.models:
        for row in (r for r in COMPILE_ROWS if r in rows):
            suite.run_row(name, row)
    suite.write()
    print()
    print("\n".join(suite.table()))
    failed = [f"{r.model}/{r.row}" for r in suite.rows if r.status == "error"]
    print(f"\ndone in {time.perf_counter() - suite.t0:.0f} s; {len(suite.rows)} rows, failed: {failed or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
