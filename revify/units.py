"""Byte counts as users write them: ``"6GiB"``, ``"512 MB"``, ``2**30``."""
from __future__ import annotations

import math
import re

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(value: int | float | str) -> int:
    """Bytes from an int or a string with units (KiB/MiB/GiB/TiB binary, KB/MB/GB/TB decimal).

    Fractions are refused: a memory budget is an amount, not a share of something.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a byte count: {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = _PATTERN.match(str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"not a byte count: {value!r} (write e.g. 6GiB, 512MB or a number of bytes)")
        number, unit = float(match.group(1)), match.group(2).lower()
    nbytes = number * _UNITS[unit]
    if not math.isfinite(nbytes) or nbytes >= 2**80:  # 1e400 parses as inf; no machine has a yottabyte
        raise ValueError(f"not a byte count this machine could have: {value!r}")
    if unit == "" and 0 < number < 1:
        raise ValueError(f"memory is an amount of bytes, not a fraction: {value!r} (write e.g. 6GiB)")
    if not nbytes > 0:
        raise ValueError(f"a byte count must be positive, got {value!r}")
    return int(nbytes)


def format_bytes(n: float) -> str:
    """Human-readable byte count (B, KiB, MiB, GiB, TiB)."""
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024.0:
            return f"{sign}{int(n)} B" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024.0
    return f"{sign}{n:.2f} TiB"


def format_flops(n: float) -> str:
    """Human-readable FLOP count (FLOP, MFLOP, GFLOP, TFLOP; decimal prefixes, as FLOP rates use)."""
    n = float(n)
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} FLOP"
