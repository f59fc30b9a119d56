"""The ``revify`` command line: convert, inspect and report on checkpoints on disk; a built-in demo.

Every command reads SRC (``revify.sources``), synthesises example inputs
from its config or ``--input-shape``, and runs the same pipeline as
``revify.revify``; ``convert`` writes the result with ``revify.save``
(atomically; ``revify.load`` reads it back).

Exit codes: 0 ok (also when nothing could be converted, unless ``--strict``),
1 conversion error, 2 usage or input error. Errors are one line on stderr,
never a traceback (``REVIFY_TRACEBACK=1`` shows it), and leave nothing written.

This package's ``main`` (the ``revify`` console script, and ``python -m
revify.cli``) parses the flags (``parser``), runs one command (``commands``,
with ``options`` turning flags into the library's arguments and ``progress``
drawing on stderr) and turns every error into its one line and exit code.
Importing it loads no torch: ``revify --help`` answers at once.
"""
from __future__ import annotations

import os
import sys
import warnings

from revify.cli.commands import run_convert, run_demo, run_inspect, run_report
from revify.cli.parser import UsageError, build_parser

COMMANDS = {"demo": run_demo, "convert": run_convert, "inspect": run_inspect, "report": run_report}


def _err(message: str) -> None:
    print(f"revify: error: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from revify.signals import run_interruptible

    # SIGINT, SIGTERM, SIGHUP: one line, exit 130 / 143 / 129, temporary folders removed
    return run_interruptible(lambda: _main(argv), _err)


def _main(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        _err(str(exc))
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    from revify.api import RevifyError
    from revify.checkpoint_io import CheckpointError
    from revify.input_checks import UsageError as InputError
    from revify.saved_plan import PlanMismatchError
    from revify.source_errors import SourceError, first_line

    try:
        with warnings.catch_warnings():
            if not getattr(args, "verbose", False):
                warnings.simplefilter("ignore")
            return COMMANDS[args.command](args)
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

