"""The four commands, each a function from parsed flags to an exit code: demo, convert, inspect, report.

Each reads SRC (``revify.cli.options.read_src``) or builds the built-in
BERT-shaped model, runs the same pipeline as ``revify.revify``, and prints
its result on stdout: the report (demo, report), the plan (inspect) or what
was written (convert; ``revify.save`` writes atomically and nothing is
written when nothing is converted). Exit 1 means nothing could be converted
and ``--strict`` asked for it (demo: the planner made no plan).
"""
from __future__ import annotations

import copy
import inspect as pyinspect
import json
import os
import time

from revify.cli.options import arch_from_working_folder, conversion_options, read_src
from revify.cli.parser import UsageError
from revify.cli.progress import log_progress, progress, stages


# --- the built-in demo model ------------------------------------------------------------------

def demo_model(layers: int, hidden: int, seq_len: int, batch: int):
    import torch

    try:
        from transformers import BertConfig, BertForSequenceClassification
    except ImportError as exc:  # transformers is in the [hf] and [test] extras
        raise UsageError(f"the demo needs transformers ({exc}); install with pip install 'revify[hf]'") from None
    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, vocab_size=30522, max_position_embeddings=max(512, seq_len))
    model = BertForSequenceClassification(config).train()
    inputs = {"input_ids": torch.randint(0, config.vocab_size, (batch, seq_len)),
              "attention_mask": torch.ones(batch, seq_len, dtype=torch.long)}
    return model, inputs


def _check_demo_flags(args) -> None:
    """The built-in model's sizes: positive, and built on the meta device first (sizes before allocation)."""
    for value, flag in ((args.layers, "--layers"), (args.hidden, "--hidden"),
                        (args.batch_size, "--batch-size"), (args.seq_len, "--seq-len")):
        if value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    from revify.input_checks import check_demo

    check_demo(args, demo_model)


# --- shared by the commands -------------------------------------------------------------------

def _convert(model, inputs, kw: dict, seed: int):
    import torch

    import revify

    torch.manual_seed(seed)  # adapter initialisation and calibration draw random numbers
    return revify.revify(model, inputs, **kw)


def _nothing_converted(plan, args, what: str) -> int:
    from revify.input_checks import raise_if_allocation_failed

    raise_if_allocation_failed(plan)  # a failed allocation is an error, not "nothing was converted"
    print(plan.summary())
    print(f"nothing was converted; {what}")
    return 1 if args.strict else 0


# --- commands ---------------------------------------------------------------------------------

def run_demo(args) -> int:
    import revify

    _check_demo_flags(args)
    model, inputs = demo_model(args.layers, args.hidden, args.seq_len, args.batch_size)
    print(f"revify demo: BERT-shaped model, {args.layers} layers, hidden {args.hidden}, "
          f"batch {args.batch_size}, seq {args.seq_len} (random weights, CPU)", flush=True)
    t0 = time.perf_counter()
    progress("converting with the budget planner: it measures the blocks and one step first")
    with log_progress():
        rmodel = revify.revify(model, inputs, strategy="checkpoint")
    progress(f"converted in {time.perf_counter() - t0:.1f} s; measuring both models' memory and "
             f"{args.repeats} paired training steps ...")
    report = revify.report(model, rmodel, inputs, repeats=args.repeats, formulas=False)
    if args.verbose:
        report.plan_summary = rmodel.revify_plan.summary(verbose=True)
    print(report)
    return 0 if rmodel.revify_plan.planned else 1


def run_convert(args) -> int:
    from revify.checkpoint_io import ConversionRecord, check_destination, options_from_plan, save

    kw = conversion_options(args)
    check_destination(args.out, args.force, "--force")  # fail before the slow part
    with stages(["load SRC", "analyse, convert, calibrate", "write DST"]) as stage:
        with stage("load SRC"):
            src, inputs = read_src(args)
        with stage("analyse, convert, calibrate"):
            rmodel = _convert(src.model, inputs, kw, args.seed)
        plan = rmodel.revify_plan
        if not plan.planned or (args.strict and not plan.converted):
            return _nothing_converted(plan, args, f"{args.out} not written")
        options = {**options_from_plan(plan), **kw, "seed": args.seed}  # what was asked, and what it meant
        rmodel._revify_record = ConversionRecord(src.info, src.spec, options, True, src.copy_files)
        with stage("write DST"):
            dst = save(rmodel, args.out, force=args.force, _flag="--force")
    print(plan.summary(verbose=args.verbose))
    if not plan.converted:
        progress(f"note: the plan keeps every activation (it already fits); {dst} is written anyway and "
                 "revify.load restores it, running as the original")
    print(f"example inputs: {src.spec.describe()} (recorded; revify.load synthesises the same)")
    size = sum(f.stat().st_size for f in dst.iterdir())
    print(f"wrote {dst} ({size / 2**20:.1f} MiB); load it with revify.load({str(dst)!r})")
    return 0


def run_inspect(args) -> int:
    from revify import api

    if args.src is not None and os.path.isfile(os.path.join(args.src, "revify.json")):
        from revify.inspect_folder import describe_folder

        arch_from_working_folder(args)  # as for SRC
        print(describe_folder(args.src, verbose=args.verbose, as_json=args.json, arch=args.arch))
        return 0
    if args.src is None:  # the built-in model
        _check_demo_flags(args)
        model, inputs = demo_model(args.layers, args.hidden, args.seq_len, args.batch_size)
        info, spec_json = {"kind": "demo"}, None
    else:
        src, inputs = read_src(args)
        model, info, spec_json = src.model, src.info, src.spec.to_json()
    kw = conversion_options(args)
    plan = api.analyse(model, inputs, **kw)
    if args.json:
        from revify.saved_plan import plan_to_json

        print(json.dumps({"source": info, "inputs": spec_json, "plan": plan_to_json(plan, detail=True)}, indent=1))
    else:
        print(plan.summary(verbose=args.verbose))
    return 1 if args.strict and not plan.converted else 0


def run_report(args) -> int:
    from revify.report import MemoryReport

    import revify

    if args.plot is not None and not callable(getattr(MemoryReport, "plot", None)):
        raise UsageError("--plot needs MemoryReport.plot, which this revify version does not have")
    from revify.input_checks import check_report_flags

    check_report_flags(args)  # --repeats, and --plot never overwrites without --force
    kw = conversion_options(args)
    with stages(["load SRC", "analyse, convert, calibrate", "measure"]) as stage:
        with stage("load SRC"):
            src, inputs = read_src(args)
        with stage("analyse, convert, calibrate"):
            # reversible conversion freezes the shared backbone; "before" is the original, training everything
            before = copy.deepcopy(src.model)
            from revify.device_step import precision
            # planned and calibrated at the precision it is measured at (no weight-cast cache: the
            # planner runs many forwards in one region, see revify.device_step.precision)
            with precision(args.device, args.dtype, cache_enabled=False):
                rmodel = _convert(src.model, inputs, kw, args.seed)
        with stage("measure"):
            extra = {}
            if "formulas" in pyinspect.signature(revify.report).parameters:
                extra["formulas"] = args.formulas  # fitting them measures several more sizes: slow
            if args.dtype != "fp32":
                extra["dtype"] = args.dtype
            report = revify.report(before, rmodel, inputs, repeats=args.repeats, **extra)
    if args.verbose:
        report.plan_summary = rmodel.revify_plan.summary(verbose=True)
    print(report.to_json() if args.json else report)
    if args.plot is not None:
        report.plot(args.plot)
    if not rmodel.revify_plan.converted and not args.json:
        print("nothing was converted; the figures compare the model with itself")
    return 1 if args.strict and not rmodel.revify_plan.converted else 0
