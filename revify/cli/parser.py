"""The ``revify`` command line's flags and help: one parser, four subcommands, built without torch.

``revify --help`` and a mistyped flag must answer at once, so this module
imports only the standard library (and ``revify.__version__``, which imports
nothing heavy); the defaults shown in help are written here rather than read
from the modules that own them. A bad command line raises ``UsageError``, one
line that ``revify.cli.main`` prints and exits 2 with, instead of argparse's
usage block and its own exit.
"""
from __future__ import annotations

import argparse

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



def build_parser() -> argparse.ArgumentParser:
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
