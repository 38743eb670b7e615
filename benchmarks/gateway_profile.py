"""Where a gateway request's CPU time goes: ``runtimestate serve`` under cProfile, at low load.

The gateway benchmark says how long a request takes; this says why. It starts the emulated vLLM
server and ``runtimestate serve`` as the gateway benchmark does, but the service runs under
:mod:`cProfile` with a CPU-time clock (``time.process_time``: time the process waits on a socket
or for the CPU is nobody's share), switched on by ``SIGUSR1`` after a warm-up and dumped on
``SIGUSR2``, so start-up and imports stay out of the figures. In between, one client sends
:data:`REQUESTS` non-streamed chat completions one after another (concurrency 1).

The profile's own time is grouped by where the code lives: the gateway, its HTTP client to the
backends, the resolver and health book it calls, uvicorn with its HTTP parser, the event loop,
Prometheus, ``json``. A builtin's time (``len``, ``isinstance``, a socket ``send``)
goes to the group of its callers, in proportion to how much of it each caller accounts for. A
deterministic profiler charges every Python call a little, so code made of many small Python
calls weighs more here than it costs unprofiled: read the shares as an order, not as
microseconds.

Run ``python -m benchmarks.gateway_profile``; :mod:`benchmarks.gateway` appends its paragraph to
the gateway section.
"""

from __future__ import annotations

import asyncio
import json
import pstats
import signal
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import aiohttp

from benchmarks.gateway import MODEL, PROMPT, served

__all__ = ["REQUESTS", "run"]

REQUESTS = 3000
WARMUP_REQUESTS = 200
COMMAND = "python -m benchmarks.gateway_profile"

# The service, profiled between SIGUSR1 and SIGUSR2; argv[1] is where the profile goes.
_PROFILED_SERVE = """
import cProfile, signal, sys, time
from runtimestate.cli.app import app
profile = cProfile.Profile(time.process_time)
out = sys.argv[1]
def dump(*_):
    profile.disable()
    profile.dump_stats(out)
signal.signal(signal.SIGUSR1, lambda *_: profile.enable())
signal.signal(signal.SIGUSR2, dump)
sys.argv = ["runtimestate", *sys.argv[2:]]
app()
"""

_GROUPS = (
    ("runtimestate/gateway/client.py", "the gateway's HTTP client"),
    ("runtimestate/gateway/", "the gateway's own code"),
    ("runtimestate/resolver/", "the resolver and the health book"),
    ("runtimestate/providers/", "the resolver and the health book"),
    ("runtimestate/", "other runtimestate code"),
    ("/uvicorn/", "uvicorn and its HTTP parser"),
    ("/h11/", "uvicorn and its HTTP parser"),
    ("/httptools/", "uvicorn and its HTTP parser"),
    # Not on the gateway's path any more; kept so that a regression would show by name.
    ("/aiohttp/", "aiohttp"),
    ("/yarl/", "aiohttp"),
    ("/multidict/", "aiohttp"),
    ("/prometheus_client/", "Prometheus"),
    ("/json/", "json"),
    ("/asyncio/", "the event loop"),
    ("selectors.py", "the event loop"),
    ("/uvloop/", "the event loop"),
)

Key = tuple[str, int, str]


def _group(key: Key) -> str:
    path = key[0]
    for marker, name in _GROUPS:
        if marker in path:
            return name
    return "other (standard library, contextlib, abc, weakref sets)"


def shares(stats: pstats.Stats) -> tuple[dict[str, float], dict[str, float], float]:
    """Each group's share of the profiled time, the gateway's own functions' shares, the total."""
    table: dict[Key, tuple[int, int, float, float, dict[Key, tuple[int, int, float, float]]]]
    table = stats.stats  # type: ignore[attr-defined]
    groups: defaultdict[str, float] = defaultdict(float)
    functions: defaultdict[str, float] = defaultdict(float)
    total = 0.0
    for key, (_, _, own, _, callers) in table.items():
        total += own
        if key[0] == "~" and callers:
            weights = {caller: entry[3] for caller, entry in callers.items()}
            whole = sum(weights.values()) or 1.0
            for caller, weight in weights.items():
                groups[_group(caller)] += own * weight / whole
        else:
            groups[_group(key)] += own
        if "runtimestate/" in key[0]:
            where = key[0].rsplit("runtimestate/", 1)[1]
            functions[f"{where}:{key[2]}"] += own
    return dict(groups), dict(functions), total


def _ranked(found: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(((k, v) for k, v in found.items() if v), key=lambda item: -item[1])


async def _send(url: str, key: str, count: int) -> None:
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 32}
    ).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"the gateway answered {response.status}")


def _profile(root: Path) -> Path:
    out = root / "serve.prof"
    with served(root, [sys.executable, "-c", _PROFILED_SERVE, str(out)]) as fleet:
        url = fleet.gateway + "/v1/chat/completions"
        asyncio.run(_send(url, fleet.key, WARMUP_REQUESTS))
        fleet.service.send_signal(signal.SIGUSR1)
        asyncio.run(_send(url, fleet.key, REQUESTS))
        fleet.service.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    if not out.exists():
        raise RuntimeError("the profiled service wrote no profile")
    return out


def run() -> str:
    """The paragraph for the gateway section: the measured shares and the command."""
    with tempfile.TemporaryDirectory(prefix="rs-bench-gateway-profile-") as tmp:
        groups, functions, total = shares(pstats.Stats(str(_profile(Path(tmp)))))
    ranked = ", ".join(f"{name} {own / total:.0%}" for name, own in _ranked(groups))
    top = ", ".join(f"`{name}` {own / total:.1%}" for name, own in _ranked(functions)[:5])
    return (
        f"Where a gateway request's CPU time goes (`{COMMAND}`: `runtimestate serve` under "
        f"cProfile with a CPU-time clock, {REQUESTS:,} non-streamed chat completions one after "
        f"another after {WARMUP_REQUESTS} of warm-up, against the same emulated vLLM server; a "
        "builtin's time goes to its callers; a deterministic profiler overweights code made of "
        f"many small Python calls, so this is an order, not microseconds): {ranked}. The "
        f"runtimestate functions with the most time of their own: {top}."
    )


if __name__ == "__main__":
    print(run())
