"""``python -m benchmarks`` (``make bench``): run every benchmark, print and record the figures.

Each benchmark module exposes ``run() -> str`` returning its Markdown section; this entry point
runs them in one process, one after another (so their figures come from the same machine in the
same state), prints each section, and writes them all to ``BENCHMARKS.md`` with the command and
the machine they were measured on. ``--only NAME`` runs one benchmark and replaces only its
section in ``BENCHMARKS.md``, keeping the others; ``--no-write`` prints without touching the file.

Each section ends with the machine's load average when it started: a figure measured while
something else ran on the machine says so, instead of every section claiming a quiet or a busy
machine in fixed words.
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


def _sections(text: str) -> list[str]:
    """The ``## `` sections of a BENCHMARKS.md, each with its heading."""
    parts = text.split("\n## ")
    return [("## " + part if i else part).rstrip("\n") + "\n" for i, part in enumerate(parts)][1:]


def _title(section: str) -> str:
    return section.split("\n", 1)[0]


def _merged(existing: str, fresh: list[str]) -> list[str]:
    """The file's sections with ``fresh`` ones replacing those of the same heading; a fresh
    section the file did not have goes at the end."""
    replaced = {_title(section): section for section in fresh}
    kept = [replaced.pop(_title(section), section) for section in _sections(existing)]
    return kept + list(replaced.values())


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
        load = os.getloadavg()[0]
        section = _runner(name)().rstrip("\n")
        section += (
            f"\n\nLoad average (1 min) when this section started: {load:.2f} on "
            f"{os.cpu_count()} CPUs; measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.\n"
        )
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
            f"Written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()}, "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}.",
            "",
        ]
        if args.only and OUTPUT.exists():
            sections = _merged(OUTPUT.read_text(), sections)
        OUTPUT.write_text("\n".join(header) + "\n" + "\n".join(sections))
        print(f"wrote {OUTPUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
