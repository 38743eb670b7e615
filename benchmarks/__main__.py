"""``python -m benchmarks`` (``make bench``): run every benchmark, print and record the figures.

Each benchmark module exposes ``run() -> str`` returning its Markdown section; this entry point
runs them in one process, one after another (so their figures come from the same machine in the
same state), prints each section, and writes them all to ``BENCHMARKS.md`` with the command and
the machine they were measured on. ``--only NAME`` runs one benchmark; ``--no-write`` prints
without touching ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

BENCHMARKS = ("reconcile", "resolve", "dashboard", "fleet", "gateway", "downloads", "replicas")
OUTPUT = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def _runner(name: str) -> Callable[[], str]:
    module = importlib.import_module(f"benchmarks.{name}")
    run: Callable[[], str] = module.run
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--only", choices=BENCHMARKS, action="append")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    sections = []
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        section = _runner(name)()
        print(section, flush=True)
        print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        sections.append(section)
    if not args.no_write:
        header = [
            "# Benchmarks",
            "",
            "Produced by `make bench` (`python -m benchmarks`); every ratio in a section is "
            "measured in the same run as its baseline.",
            "",
            f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()}, "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}.",
            "",
        ]
        OUTPUT.write_text("\n".join(header) + "\n" + "\n".join(sections))
        print(f"wrote {OUTPUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
