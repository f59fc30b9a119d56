"""The ``revify`` command line: convert, inspect and report on checkpoints on disk; a built-in demo.

Every command reads SRC (``revify.sources``), synthesises example inputs
from its config or ``--input-shape``, and runs the same pipeline as
``revify.revify``; ``convert`` writes the result with ``revify.save``
(atomically; ``revify.load`` reads it back).

Exit codes: 0 ok (also when nothing could be converted, unless ``--strict``),
1 conversion error, 2 usage or input error. Errors are one line on stderr,
never a traceback (``REVIFY_TRACEBACK=1`` shows it), and leave nothing written.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import inspect as pyinspect
import json
import os
import sys
import time
import warnings
from typing import Any, Iterator

EXAMPLES = """examples:
  revify convert ./bert-base --out ./bert-base-revified
  revify convert ./gpt2 --out ./gpt2-meft --strategy reversible --coupling meft1 --seq-len 512
  revify inspect ./llama --seq-len 256 --json
  revify report ./bert-base --batch-size 8 --seq-len 128
  revify demo                          convert a built-in 6-layer BERT-shaped model, print the report
"""
CONVERT_EXAMPLES = """examples:
  revify convert ./bert-base --out ./bert-ckpt                     checkpoint blocks (same gradients)
  revify convert ./gpt2 --out ./gpt2-meft --strategy reversible    MEFT1 couplings, adapters, frozen backbone
  revify convert ./opt --out ./opt-meft3 --strategy reversible --coupling meft3 --tolerance 1e-6
  revify convert weights.safetensors --arch mypkg.models:build --input-shape 8x32 --out ./mine
  revify convert whole_model.pt --trust-pickle --input-shape 4x3x32x32 --out ./mine

SRC is a Hugging Face folder (config.json + model.safetensors or pytorch_model.bin, as save_pretrained
writes it), a state dict (.safetensors or torch.save, read with weights_only=True) with --arch, or a
whole pickled module with --trust-pickle. --arch imports and calls your code; --trust-pickle unpickles,
which runs arbitrary code: use them only on files you trust.

DST is a folder: the original config.json, model.safetensors (all weights, adapters included; plain
transformers can still from_pretrained it) and revify.json (the plan). Load it in Python with
revify.load(DST). Nothing is written if the conversion fails or converts nothing.
"""
INSPECT_EXAMPLES = """examples:
  revify inspect ./bert-base                       blocks, chains, legality reasons and the plan
  revify inspect ./gpt2 --strategy reversible --coupling meft3 --json
  revify inspect                                   the built-in BERT-shaped demo model
"""
REPORT_EXAMPLES = """examples:
  revify report ./bert-base --batch-size 8 --seq-len 128
  revify report ./gpt2 --strategy reversible --json
  revify report ./llama --plot memory.png

The report MEASURES one training step of the original (training all its parameters) and of the
converted model on synthesised inputs of the given size, on this machine.
"""
DEMO_EXAMPLES = """examples:
  revify demo                          convert a built-in 6-layer BERT-shaped model, print the report
  revify demo --layers 12 --hidden 768 BERT-base shape (slower)
"""


PAIRS = 7  # revify.step_timing.PAIRS, without importing torch for --help


class UsageError(ValueError):
    """A bad command line or input; exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise UsageError(f"{message} (see {self.prog} --help)")


def _err(message: str) -> None:
    print(f"revify: error: {message}", file=sys.stderr, flush=True)


def _progress(message: str) -> None:
    print(f"revify: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _log_progress() -> Iterator[None]:
    """Show the planner's progress messages (logger ``revify.planner``) on stderr, with elapsed seconds."""
    import logging

    start = time.perf_counter()

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            _progress(f"[{time.perf_counter() - start:5.1f} s] {record.getMessage()}")

    logger = logging.getLogger("revify.planner")
    handler, level = _Handler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def _stages(names: list[str]) -> Iterator[Any]:
    """A progress bar over the stages of a command; silent when stderr is not a terminal."""
    from tqdm import tqdm

    bar = tqdm(total=len(names), file=sys.stderr, disable=not sys.stderr.isatty(), leave=False,
               bar_format="{desc:<40} {bar} {n_fmt}/{total_fmt} [{elapsed}]")

    @contextlib.contextmanager
    def stage(name: str) -> Iterator[None]:
        bar.set_description_str(name)
        yield
        bar.update(1)

    try:
        yield stage
    finally:
        bar.close()


# --- the built-in demo model ------------------------------------------------------------------

def _demo_model(layers: int, hidden: int, seq_len: int, batch: int):
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


def _cmd_demo(args) -> int:
    import revify

    model, inputs = _demo_model(args.layers, args.hidden, args.seq_len, args.batch_size)
    print(f"revify demo: BERT-shaped model, {args.layers} layers, hidden {args.hidden}, "
          f"batch {args.batch_size}, seq {args.seq_len} (random weights, CPU)", flush=True)
    t0 = time.perf_counter()
    _progress("converting with the budget planner: it measures the blocks and one step first")
    with _log_progress():
        rmodel = revify.revify(model, inputs, strategy="checkpoint")
    _progress(f"converted in {time.perf_counter() - t0:.1f} s; measuring both models' memory and "
              f"{args.repeats} paired training steps ...")
    report = revify.report(model, rmodel, inputs, repeats=args.repeats, formulas=False)
    if args.verbose:
        report.plan_summary = rmodel.revify_plan.summary(verbose=True)
    print(report)
    return 0 if rmodel.revify_plan.planned else 1


# --- options shared by convert, inspect and report -------------------------------------------

_REVERSIBLE_FLAGS = ("coupling", "lam", "beta", "adapter_rank", "adapter_init", "freeze_backbone", "tolerance",
                     "stream_dtype")


def _conversion_options(args) -> dict:
    """Keyword arguments for ``revify.revify``: only the options given, so the API's defaults apply.

    Validated before any slow work.
    """
    from revify import api
    from revify.passes.planning.plan_checkpoint import SCHEDULES
    from revify.passes.planning.plan_reversible import ReversibleOptions
    from revify.units import parse_bytes

    accepted = pyinspect.signature(api.revify).parameters
    if args.strategy not in api.STRATEGIES:
        raise UsageError(f"--strategy {args.strategy} is not available in this revify version "
                         f"(choose {', '.join(api.STRATEGIES)})")
    kw: dict[str, Any] = {"strategy": args.strategy}
    if args.schedule is not None:
        if args.schedule not in SCHEDULES:
            raise UsageError(f"--schedule {args.schedule}: choose one of {', '.join(SCHEDULES)}")
        kw["schedule"] = args.schedule
    reversible = {k: getattr(args, k) for k in _REVERSIBLE_FLAGS if getattr(args, k) is not None}
    try:
        ReversibleOptions(**reversible).validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    kw.update(reversible)
    if getattr(args, "budget", None) is not None:
        if "memory_budget" not in accepted:
            raise UsageError("--budget needs the budget planner, which this revify version does not have")
        try:
            kw["memory_budget"] = parse_bytes(args.budget)
        except ValueError as exc:
            raise UsageError(f"--budget: {exc}") from None
    if getattr(args, "budget_for", None) is not None:
        if getattr(args, "budget", None) is None:
            raise UsageError("--budget-for says what --budget bounds; give --budget too")
        kw["budget_for"] = args.budget_for
    if getattr(args, "recompute_cost", None) is not None:
        if "recompute_cost" not in accepted:
            raise UsageError("--recompute-cost needs a revify version whose planner has it")
        kw["recompute_cost"] = args.recompute_cost
    return kw


def _read(args):
    from revify.sources import read_source

    for value, flag in ((args.batch_size, "--batch-size"), (args.seq_len, "--seq-len")):
        if value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    if args.arch is not None and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like other module:object tools, --arch finds modules in the working folder
    from revify.input_checks import check_cli_inputs

    src = read_source(args.src, arch=args.arch, trust_pickle=args.trust_pickle, batch_size=args.batch_size,
                      seq_len=args.seq_len, input_shapes=args.input_shape)
    if src.spec is None:
        raise UsageError("--arch and pickled sources need --input-shape (e.g. --input-shape 8x32; "
                         "repeat it for several positional inputs)")
    check_cli_inputs(src.model, src.spec, args.device)  # sizes before allocation: one line, never an OOM kill
    src.model.to(args.device)
    return src, src.spec.synthesise(args.device)


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

def _cmd_convert(args) -> int:
    from revify.checkpoint_io import ConversionRecord, check_destination, options_from_plan, save

    kw = _conversion_options(args)
    check_destination(args.out, args.force, "--force")  # fail before the slow part
    with _stages(["load SRC", "analyse, convert, calibrate", "write DST"]) as stage:
        with stage("load SRC"):
            src, inputs = _read(args)
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
        _progress(f"note: the plan keeps every activation (it already fits); {dst} is written anyway and "
                  "revify.load restores it, running as the original")
    print(f"example inputs: {src.spec.describe()} (recorded; revify.load synthesises the same)")
    size = sum(f.stat().st_size for f in dst.iterdir())
    print(f"wrote {dst} ({size / 2**20:.1f} MiB); load it with revify.load({str(dst)!r})")
    return 0


def _cmd_inspect(args) -> int:
    from revify import api

    if args.src is not None and os.path.isfile(os.path.join(args.src, "revify.json")):
        from revify.inspect_folder import describe_folder

        if args.arch is not None and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as for SRC: --arch finds modules in the working folder
        print(describe_folder(args.src, verbose=args.verbose, as_json=args.json, arch=args.arch))
        return 0
    if args.src is None:  # the built-in model
        for value, flag in ((args.layers, "--layers"), (args.hidden, "--hidden"),
                            (args.batch_size, "--batch-size"), (args.seq_len, "--seq-len")):
            if value <= 0:
                raise UsageError(f"{flag} must be positive, got {value}")
        from revify.input_checks import check_demo

        check_demo(args, _demo_model)  # built on the meta device first: sizes before allocation
        model, inputs = _demo_model(args.layers, args.hidden, args.seq_len, args.batch_size)
        info, spec_json = {"kind": "demo"}, None
    else:
        src, inputs = _read(args)
        model, info, spec_json = src.model, src.info, src.spec.to_json()
    kw = _conversion_options(args)
    plan = api.analyse(model, inputs, **kw)
    if args.json:
        from revify.saved_plan import plan_to_json

        print(json.dumps({"source": info, "inputs": spec_json, "plan": plan_to_json(plan, detail=True)}, indent=1))
    else:
        print(plan.summary(verbose=args.verbose))
    return 1 if args.strict and not plan.converted else 0


def _cmd_report(args) -> int:
    from revify.report import MemoryReport

    import revify

    if args.plot is not None and not callable(getattr(MemoryReport, "plot", None)):
        raise UsageError("--plot needs MemoryReport.plot, which this revify version does not have")
    from revify.input_checks import check_report_flags

    check_report_flags(args)  # --repeats, and --plot never overwrites without --force
    kw = _conversion_options(args)
    with _stages(["load SRC", "analyse, convert, calibrate", "measure"]) as stage:
        with stage("load SRC"):
            src, inputs = _read(args)
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


# --- the parser -------------------------------------------------------------------------------

def _add_source(p: argparse.ArgumentParser, optional: bool = False) -> None:
    if optional:
        p.add_argument("src", nargs="?", metavar="SRC", help="model folder or weights file (default: built-in model)")
    else:
        p.add_argument("src", metavar="SRC", help="Hugging Face model folder, state dict file or pickled module")
    g = p.add_argument_group("source and example inputs")
    g.add_argument("--arch", metavar="MODULE:FACTORY",
                   help="callable that builds the model for a state dict SRC (imports and runs your code; "
                        "default: none, a Hugging Face folder needs none)")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow SRC to be a whole pickled module (unpickling runs arbitrary code)")
    g.add_argument("--batch-size", type=int, default=2, help="batch of the synthesised inputs (default 2)")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per sequence for text models (default 128)")
    g.add_argument("--input-shape", action="append", metavar="SHAPE[:DTYPE[:HIGH]]",
                   help="a positional input for --arch or pickled sources, e.g. 8x32 or 2x16:int64:50 "
                        "(token ids below 50); repeat for several inputs (default: from the model's config)")
    g.add_argument("--device", default="cpu", help="device to convert on (default cpu)")
    g.add_argument("--seed", type=int, default=0, help="seed for adapter initialisation and calibration (default 0)")


def _add_conversion(p: argparse.ArgumentParser) -> None:
    # defaults are None: an option left out takes the default of revify.revify for the strategy
    g = p.add_argument_group("conversion (defaults: those of revify.revify)")
    g.add_argument("--strategy", default="checkpoint",
                   help="checkpoint: same gradients, blocks recomputed (default); reversible: MEFT/RevNet "
                        "couplings (changes the architecture); auto: the budget planner may also use reversible")
    g.add_argument("--budget", metavar="BYTES",
                   help="memory budget, e.g. 6GiB: bounds the step's predicted peak (activations, gradients, "
                        "temporaries), or with --budget-for activations the bytes kept for backward (default: "
                        "none, the least memory the planner reaches)")
    g.add_argument("--budget-for", choices=("peak", "activations"),
                   help="what --budget bounds: peak (default) or activations (memory_budget / budget_for in "
                        "revify.revify)")
    g.add_argument("--schedule", help="checkpoint schedule: budget (the planner, default), sqrt(n) or per-block")
    g.add_argument("--recompute-cost", choices=("time", "flops"),
                   help="what the budget planner minimises: measured recompute time (default) or FLOPs "
                        "(the same plan on every run)")
    g.add_argument("--coupling", choices=("meft1", "meft2", "meft3", "revnet"),
                   help="reversible coupling (default meft1)")
    g.add_argument("--lam", type=float, help="λ, scaling of the first stream (default: the coupling's)")
    g.add_argument("--beta", type=float, help="β, scaling of the second stream (default: the coupling's)")
    g.add_argument("--adapter-rank", type=int, help="adapter bottleneck rank (default 8)")
    g.add_argument("--adapter-init", choices=("zero", "normal"), help="adapter up-projection init (default zero)")
    freeze = g.add_mutually_exclusive_group()
    freeze.add_argument("--freeze-backbone", dest="freeze_backbone", action="store_true", default=None,
                        help="train only adapters and the task head (default for --strategy reversible)")
    freeze.add_argument("--train-backbone", dest="freeze_backbone", action="store_false",
                        help="train every parameter")
    g.add_argument("--tolerance", type=float,
                   help="reversible: relative reconstruction error allowed before an anchor (default 1e-4)")
    g.add_argument("--stream-dtype", choices=("float64", "float32", "bfloat16", "float16"),
                   help="reversible: dtype of the two streams (default: one step wider than the model)")
    g.add_argument("--strict", action="store_true", help="exit 1 if nothing can be converted (default off)")
    g.add_argument("--verbose", action="store_true",
                   help="also show capture details (what torch.fx traced, why it could not trace the rest) and "
                        "warnings from torch and transformers (default off)")


def _parser() -> argparse.ArgumentParser:
    from revify import __version__

    p = _Parser(prog="revify", description="Make PyTorch training fit in less activation memory.",
                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"revify {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    c = sub.add_parser("convert", help="convert a checkpoint on disk and write a revify folder",
                       description="Convert SRC and write the converted model to the folder DST.",
                       epilog=CONVERT_EXAMPLES, formatter_class=fmt)
    _add_source(c)
    c.add_argument("--out", required=True, metavar="DST", help="folder to write (must not exist)")
    c.add_argument("--force", action="store_true", help="replace DST if it is a revify folder")
    _add_conversion(c)

    i = sub.add_parser("inspect", help="print blocks, chains, legality reasons and the plan",
                       description="Analyse SRC (or the built-in model) and print what revify would do.",
                       epilog=INSPECT_EXAMPLES, formatter_class=fmt)
    _add_source(i, optional=True)
    i.add_argument("--json", action="store_true", help="print the analysis as JSON")
    _add_conversion(i)
    demo = i.add_argument_group("built-in model (without SRC)")
    demo.add_argument("--layers", type=int, default=6, help="encoder layers (default 6)")
    demo.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")

    r = sub.add_parser("report", help="measure memory and time of a training step before and after",
                       description="Convert SRC in memory and measure one training step before and after.",
                       epilog=REPORT_EXAMPLES, formatter_class=fmt)
    _add_source(r)
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.add_argument("--plot", metavar="PNG", help="also draw the memory report to this image file (default: none)")
    r.add_argument("--repeats", type=int, default=PAIRS,
                   help=f"timed pairs of steps, alternating the two models after a warm-up (default {PAIRS})")
    r.add_argument("--force", action="store_true", help="overwrite the --plot file if it exists")
    r.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="bf16/fp16: each forward under torch.autocast on --device (default fp32)")
    r.add_argument("--formulas", action="store_true",
                   help="also fit memory as a formula of batch size and sequence length (measures more sizes)")
    _add_conversion(r)

    d = sub.add_parser("demo", help="convert a built-in BERT-shaped model and print the memory report",
                       description="Convert a built-in BERT-shaped model (random weights) and print the "
                                   "measured memory report. No files, no network.",
                       epilog=DEMO_EXAMPLES, formatter_class=fmt)
    d.add_argument("--layers", type=int, default=6, help="encoder layers (default 6)")
    d.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    d.add_argument("--batch-size", type=int, default=4, help="batch of the random inputs (default 4)")
    d.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    d.add_argument("--repeats", type=int, default=5,
                   help="timed pairs of steps, alternating the two models after a warm-up (default 5)")
    d.add_argument("--verbose", action="store_true", help="also show capture details (default off)")
    return p


def _run(args) -> int:
    if args.command == "demo":
        for value, flag in ((args.layers, "--layers"), (args.hidden, "--hidden"),
                            (args.batch_size, "--batch-size"), (args.seq_len, "--seq-len")):
            if value <= 0:
                raise UsageError(f"{flag} must be positive, got {value}")
        from revify.input_checks import check_demo

        check_demo(args, _demo_model)
        return _cmd_demo(args)
    handler = {"convert": _cmd_convert, "inspect": _cmd_inspect, "report": _cmd_report}[args.command]
    return handler(args)


def main(argv: list[str] | None = None) -> int:
    from revify.signals import run_interruptible

    # SIGINT, SIGTERM, SIGHUP: one line, exit 130 / 143 / 129, temporary folders removed
    return run_interruptible(lambda: _main(argv), _err)


def _main(argv: list[str] | None) -> int:
    try:
        args = _parser().parse_args(argv)
    except UsageError as exc:
        _err(str(exc))
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    from revify.api import RevifyError
    from revify.checkpoint_io import CheckpointError
    from revify.input_checks import UsageError as InputError
    from revify.saved_plan import PlanMismatchError
    from revify.sources import SourceError, first_line

    try:
        with warnings.catch_warnings():
            if not getattr(args, "verbose", False):
                warnings.simplefilter("ignore")
            return _run(args)
    except (UsageError, InputError, SourceError, CheckpointError, PlanMismatchError) as exc:
        _err(str(exc))
        return 2
    except BrokenPipeError:  # stdout closed early (revify report ... | head): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:  # signals not handled (not the main thread)
        _err("interrupted; nothing written")
        return 130
    except Exception as exc:  # a conversion that fails must not dump a traceback on the user
        if os.environ.get("REVIFY_TRACEBACK"):
            raise
        prefix = "conversion failed: " if not isinstance(exc, RevifyError) else ""
        _err(f"{prefix}{first_line(exc)} (REVIFY_TRACEBACK=1 shows where)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
