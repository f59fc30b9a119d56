"""What a command shows on stderr while it runs: progress lines, the planner's log, a stage bar.

Converting or reporting on a real model takes minutes; the user should see
which stage is running and what the budget planner is measuring. Everything
goes to stderr, so stdout keeps only the result (a summary, JSON) for pipes,
and the bar draws only on a terminal.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Iterator


def progress(message: str) -> None:
    """One ``revify: ...`` line on stderr."""
    print(f"revify: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def log_progress() -> Iterator[None]:
    """Show the planner's progress messages (logger ``revify.planner``) on stderr, with elapsed seconds."""
    import logging

    start = time.perf_counter()

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            progress(f"[{time.perf_counter() - start:5.1f} s] {record.getMessage()}")

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
def stages(names: list[str]) -> Iterator[Any]:
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
