"""How fast revify starts: ``import revify``, ``revify --help`` and ``revify --version``, each in a fresh process.

Goal: each under 1 s (``import revify`` resolves its public names on first use, so it imports neither torch
nor torch._dynamo, transformers, sympy or matplotlib). ``-X importtime`` gives the import's own cumulative
microseconds; the wall-clock figures include starting Python. ``--demo`` also times ``revify demo``
(goal: under 30 s on 2 cores).

    python bench/startup_bench.py [--repeats 5] [--demo]
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REVIFY = str(Path(sys.executable).with_name("revify"))


def wall(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def import_time_us(module: str) -> int:
    """Cumulative microseconds ``python -X importtime`` reports for ``module`` itself."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], check=True,
                         capture_output=True, text=True)
    for line in res.stderr.splitlines():
        found = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s?(\S+)$", line)
        if found and found.group(2) == module:
            return int(found.group(1))
    raise RuntimeError(f"{module} not in the -X importtime output")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="fresh processes per figure (median, default 5)")
    ap.add_argument("--demo", action="store_true", help="also time `revify demo` once (default off)")
    args = ap.parse_args()
    imports = [import_time_us("revify") for _ in range(args.repeats)]
    print(f"import revify (-X importtime, cumulative):   {statistics.median(imports) / 1e3:8.1f} ms   goal < 1000 ms")
    print(f"python -c 'import revify' (wall, with Python): {wall([sys.executable, '-c', 'import revify'], args.repeats) * 1e3:8.1f} ms")
    print(f"revify --help (wall):                          {wall([REVIFY, '--help'], args.repeats) * 1e3:8.1f} ms   goal < 1000 ms")
    print(f"revify --version (wall):                       {wall([REVIFY, '--version'], args.repeats) * 1e3:8.1f} ms")
    first = "import revify; revify.revify"  # the first use pays torch, its compiler stack and the passes
    print(f"first use, {first!r} (wall): {wall([sys.executable, '-c', first], 1):.2f} s")
    if args.demo:
        print(f"revify demo (wall): {wall([REVIFY, 'demo'], 1):.1f} s   goal < 30 s on 2 cores")


if __name__ == "__main__":
    main()
