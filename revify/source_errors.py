"""The error every reader of SRC raises, and the one line of an exception it shows.

Reading a model from disk fails in many ways (no config.json, a truncated
safetensors header, a factory that raises, a bad ``--input-shape``); the
command line prints each as one line and exits 2. The readers of Hugging Face
folders (``revify.hf_folder``), weights files (``revify.weights_file``) and
example inputs (``revify.example_inputs``) raise this one type so that the CLI
catches one exception, and quote other libraries' errors with ``first_line``
so that a multi-line message never reaches the user whole.
"""
from __future__ import annotations

from revify.messages import one_line


class SourceError(ValueError):
    """SRC cannot be read, or it is not what its form claims; the message is one line."""


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``, or the type alone when the message is empty."""
    return one_line(exc, limit=None)
