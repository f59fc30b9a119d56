"""One line of an exception, for reasons and errors a user reads.

Capture, sub-layer splitting and memory prediction record why something
failed (``fx: TraceError: ...``) in plan summaries and reports, and the
command line prints a reader's error as one line; a multi-line traceback
message never reaches the user whole, and a long line is cut at a word
boundary, never mid-word.
"""
from __future__ import annotations


def one_line(exc: BaseException, limit: int | None = 200) -> str:
    """``Type: first line of the message`` (the type alone when it is empty), at most ``limit`` characters,
    a longer one cut after a whole word and marked with an ellipsis."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    if limit is None or len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + " …"
