"""From the command line's flags to what the library takes: ``revify.revify``'s keyword arguments, a model and inputs.

Every value is checked here, before any slow work, so a bad flag costs the
user no model load: the strategy and schedule by name, the reversible options
by ``ReversibleOptions.validate``, the budget by ``parse_bytes``, the sizes of
the synthesised inputs against this machine (``revify.input_checks``). Only
options the user gave are passed on, so the API's defaults for the chosen
strategy apply.
"""
from __future__ import annotations

import inspect as pyinspect
import os
import sys
from typing import Any

from revify.cli.parser import UsageError

_REVERSIBLE_FLAGS = ("coupling", "lam", "beta", "adapter_rank", "adapter_init", "freeze_backbone", "tolerance",
                     "stream_dtype")


def conversion_options(args) -> dict:
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


def read_src(args):
    """SRC as a model on ``--device`` and its synthesised example inputs; sizes checked before allocation."""
    from revify.sources import read_source

    for value, flag in ((args.batch_size, "--batch-size"), (args.seq_len, "--seq-len")):
        if value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    arch_from_working_folder(args)
    from revify.input_checks import check_cli_inputs

    src = read_source(args.src, arch=args.arch, trust_pickle=args.trust_pickle, batch_size=args.batch_size,
                      seq_len=args.seq_len, input_shapes=args.input_shape)
    if src.spec is None:
        raise UsageError("--arch and pickled sources need --input-shape (e.g. --input-shape 8x32; "
                         "repeat it for several positional inputs)")
    check_cli_inputs(src.model, src.spec, args.device)  # sizes before allocation: one line, never an OOM kill
    src.model.to(args.device)
    return src, src.spec.synthesise(args.device)


def arch_from_working_folder(args) -> None:
    """Like other module:object tools, ``--arch`` finds modules in the working folder."""
    if args.arch is not None and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
