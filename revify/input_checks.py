"""Command-line values checked before any slow or large work: one line and exit 2, never a crash later.

The parser checks types; these check meaning: the device exists, counts are
positive, an output file is not silently overwritten, and one training step
on the requested sizes fits in free memory (``fits``, predicted on fake
tensors). A failed allocation that the analysis recorded as a reason for
converting nothing is turned back into an error.

Before::

    revify convert ./bert --out x --device nosuch        # RuntimeError traceback summary, exit 1
    revify report ./bert --plot memory.png               # memory.png silently replaced
    revify convert ./bert --out x --seq-len 200000       # "nothing was converted", exit 0

After::

    revify: error: --device 'nosuch' is not a device torch knows (...)               exit 2
    revify: error: --plot memory.png already exists; pass --force to overwrite it    exit 2
    revify: error: conversion failed: RuntimeError: an allocation failed ...         exit 1
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from revify.fits import StepTooLarge, check_step_fits, is_allocation_failure
from revify.safe_paths import output_file_problem


class UsageError(ValueError):
    """A command-line value refused before the work starts; the command line exits 2 with its one line.

    Not ``revify.cli.parser.UsageError``: these checks sit below the command line and never import it.
    """


def check_device(name: str) -> torch.device:
    from revify.folder_checks import FolderProblem, check_device as check

    try:
        return check(name)
    except FolderProblem as exc:
        raise UsageError(f"--{exc}") from None


def check_cli_inputs(model: Any, spec: Any, device: str) -> None:
    """The device, then the predicted training step against free memory."""
    check_device(device)
    try:
        check_step_fits(model, spec, device)
    except StepTooLarge as exc:
        raise UsageError(f"{exc}; lower --batch-size or --seq-len") from None


def check_report_flags(args: Any) -> None:
    if args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {args.repeats}")
    if args.plot is not None:
        problem = output_file_problem(Path(args.plot), getattr(args, "force", False), "--force")
        if problem:
            raise UsageError(f"--plot {problem}")


def check_demo(args: Any, build: Callable[[int, int, int, int], tuple]) -> None:
    """The demo's model and step, built on the meta device first (no memory), must fit."""
    from revify.example_inputs import InputSpec

    if getattr(args, "repeats", 1) < 1:
        raise UsageError(f"--repeats must be at least 1, got {args.repeats}")
    with torch.device("meta"):
        model, inputs = build(args.layers, args.hidden, args.seq_len, args.batch_size)
    spec = InputSpec("kwargs", tuple((k, _meta_spec(v)) for k, v in inputs.items()))
    try:
        check_step_fits(model, spec, "cpu")
    except StepTooLarge as exc:
        raise UsageError(f"{exc}; lower --batch-size, --seq-len, --layers or --hidden") from None


def _meta_spec(t: torch.Tensor) -> Any:
    from revify.example_inputs import TensorSpec

    return TensorSpec(tuple(t.shape), str(t.dtype).removeprefix("torch."), "randn")


def raise_if_allocation_failed(plan: Any) -> None:
    """An analysis that failed to allocate is an error (exit 1), never "nothing was converted" (exit 0)."""
    for error in getattr(plan, "errors", []) or []:
        if is_allocation_failure(str(error)):
            raise RuntimeError(f"an allocation failed, so nothing could be converted: {str(error).splitlines()[0]}")
