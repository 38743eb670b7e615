"""Gateway benchmark: an emulated vLLM server called directly, through ``runtimestate serve``'s
gateway, and through the LiteLLM proxy, in one run against the same backend.

Three processes besides this one: the emulator (``python -m runtimestate.testing --vllm 1``),
the service (``runtimestate serve``, SQLite, one declared vLLM backend, one gateway key) and,
when it can be installed, the LiteLLM proxy 1.110.2 with one worker. LiteLLM is installed by this
benchmark from ``litellm-requirements.txt`` (next to this file) into its own virtual environment
under ``~/.cache/runtimestate-bench/`` - never a dependency of the project - and run offline (no
price-table or tokenizer download at start-up). When it cannot be installed, the table says so
and shows the other two.

The load comes from this process: an aiohttp client sending OpenAI chat completions, at
concurrency 1 and 64, non-streamed and streamed, each for a fixed time after a warm-up. Per
configuration: p50 and p99 latency (to the last byte), time to the first streamed chunk, requests
per second, and for the gateway its CPU time per request (user + system of the service process,
from ``/proc``, divided by the requests served in that window). The client shares the machine
with the servers it measures, so the figures are an upper bound on what each proxy adds.

The section ends with where the gateway's CPU time goes, from a profile of the service at low
load (:mod:`benchmarks.gateway_profile`, its own processes, after the load runs).

Run ``python -m benchmarks --only gateway``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx

__all__ = ["run"]

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
TOKEN = "bench-admin-token-0123456789"
LITELLM_KEY = "sk-bench-litellm-0123456789"
LITELLM_VERSION = "1.110.2"
WARMUP = 0.5
SECONDS = {1: 3.0, 64: 5.0}
PROMPT = "Say something short about routing requests to the right backend."
_CLK = os.sysconf("SC_CLK_TCK")
REQUIREMENTS = Path(__file__).with_name("litellm-requirements.txt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK


@contextlib.contextmanager
def _process(
    argv: list[str], *, env: dict[str, str] | None = None, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=out, env=env)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_http(url: str, *, headers: dict[str, str] | None = None, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, headers=headers, timeout=2).status_code < 500:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up within {seconds:g} s")


@dataclass(frozen=True)
class Target:
    name: str
    url: str  # the OpenAI API root
    key: str
    pid: int | None = None  # whose CPU time to report


@dataclass(frozen=True)
class Figures:
    p50_ms: float
    p99_ms: float
    ttft_ms: float | None
    rps: float
    cpu_ms: float | None
    errors: int


async def _load(target: Target, *, concurrency: int, stream: bool) -> Figures:
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 32,
            "stream": stream,
        }
    ).encode()
    headers = {"Authorization": f"Bearer {target.key}", "Content-Type": "application/json"}
    url = target.url + "/chat/completions"
    latencies: list[float] = []
    firsts: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        measuring = False
        stop_at = time.perf_counter() + WARMUP + SECONDS[concurrency]

        async def one() -> None:
            nonlocal errors
            started = time.perf_counter()
            first: float | None = None
            async with session.post(url, data=body, headers=headers) as response:
                if stream:
                    async for _ in response.content.iter_any():
                        if first is None:
                            first = time.perf_counter()
                else:
                    await response.read()
                ok = response.status == 200
            ended = time.perf_counter()
            if not measuring:
                return
            if not ok:
                errors += 1
                return
            latencies.append(ended - started)
            if first is not None:
                firsts.append(first - started)

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                await one()

        async def switch() -> None:
            nonlocal measuring
            await asyncio.sleep(WARMUP)
            measuring = True

        cpu_before = 0.0
        switcher = asyncio.create_task(switch())
        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await switcher
        begun = time.perf_counter()
        if target.pid is not None:
            cpu_before = _cpu_seconds(target.pid)
        await asyncio.gather(*workers)
        elapsed = time.perf_counter() - begun
        cpu = _cpu_seconds(target.pid) - cpu_before if target.pid is not None else None
    latencies.sort()
    count = len(latencies)
    return Figures(
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=latencies[min(count - 1, int(count * 0.99))] * 1000,
        ttft_ms=statistics.median(firsts) * 1000 if firsts else None,
        rps=count / elapsed,
        cpu_ms=cpu * 1000 / count if cpu is not None and count else None,
        errors=errors,
    )


def _litellm_python(requirements: Path, log: Path) -> Path | None:
    """The LiteLLM venv's ``litellm`` command, installing it on first use; None when it cannot
    be had. The venv is keyed by the requirements' digest, so a changed list gets a new one."""
    pins = [line for line in requirements.read_text().splitlines() if not line.startswith("#")]
    digest = hashlib.sha256("\n".join(pins).encode()).hexdigest()[:12]
    venv = Path.home() / ".cache" / "runtimestate-bench" / f"litellm-{LITELLM_VERSION}-{digest}"
    binary = venv / "bin" / "litellm"
    if binary.exists():
        return binary
    with log.open("ab") as out:
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], stdout=out, stderr=out)
        if made.returncode != 0:
            return None
        pip = [str(venv / "bin" / "pip"), "install", "-q", "-r", str(requirements)]
        if subprocess.run(pip, stdout=out, stderr=out).returncode != 0:
            return None
    return binary if binary.exists() else None


def _declare(gateway: str, backend_url: str) -> str:
    with httpx.Client(
        base_url=gateway, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    ) as admin:
        admin.post(
            "/backends", json={"name": "vllm-0", "baseUrl": backend_url, "type": "vllm"}
        ).raise_for_status()
        admin.post(
            "/models",
            json={
                "model": MODEL,
                "contextLength": 8192,
                "canChat": True,
                "canPrompt": True,
                "canStream": True,
            },
        ).raise_for_status()
        admin.post("/state/sync").raise_for_status()
        created = admin.post("/gateway/keys", json={"name": "bench"})
        created.raise_for_status()
        key: str = created.json()["key"]
        return key


def _table(results: dict[tuple[str, bool, int], Figures], direct: str) -> list[str]:
    lines = [
        "| target | stream | concurrency | p50 ms | p99 ms | added p50 ms | TTFT ms | rps "
        "| CPU ms/req |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, stream, concurrency), fig in results.items():
        base = results.get((direct, stream, concurrency))
        added = f"{fig.p50_ms - base.p50_ms:+.2f}" if base is not None and name != direct else ""
        ttft = f"{fig.ttft_ms:.2f}" if fig.ttft_ms is not None else ""
        cpu = f"{fig.cpu_ms:.3f}" if fig.cpu_ms is not None else ""
        errors = f" ({fig.errors} errors)" if fig.errors else ""
        lines.append(
            f"| {name} | {'yes' if stream else 'no'} | {concurrency} | {fig.p50_ms:.2f} | "
            f"{fig.p99_ms:.2f} | {added} | {ttft} | {fig.rps:.0f}{errors} | {cpu} |"
        )
    return lines


@dataclass(frozen=True)
class Served:
    """The emulated vLLM server and ``runtimestate serve`` in front of it, ready for load."""

    backend_url: str
    gateway: str
    key: str
    service: subprocess.Popen[bytes]
    env: dict[str, str]


@contextlib.contextmanager
def served(root: Path, serve: list[str]) -> Iterator[Served]:
    """Start the emulator and the service (``serve``: the argv that runs ``runtimestate``, to
    which ``serve --port N`` is added), declare the backend, its model and a gateway key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNTIMESTATE_")}
    emu_argv = [sys.executable, "-m", "runtimestate.testing", "--vllm", "1", "--vllm-model", MODEL]
    with _process(emu_argv, env=env, log=root / "emulator.log") as emulator:
        assert emulator.stdout is not None
        backend_url = f"{emulator.stdout.readline().decode().strip()}/vllm/vllm-0"
        port = _free_port()
        serve_env = {
            **env,
            "RUNTIMESTATE_DATA_DIR": str(root / "data"),
            "RUNTIMESTATE_TOKEN": TOKEN,
            "RUNTIMESTATE_CYCLE_INTERVAL": "3600",
            "RUNTIMESTATE_LOG_LEVEL": "WARNING",
        }
        argv = [*serve, "serve", "--port", str(port)]
        with _process(argv, env=serve_env, log=root / "serve.log") as service:
            gateway = f"http://127.0.0.1:{port}"
            _wait_http(gateway + "/health")
            key = _declare(gateway, backend_url)
            yield Served(
                backend_url=backend_url, gateway=gateway, key=key, service=service, env=env
            )


def run() -> str:
    with tempfile.TemporaryDirectory(prefix="rs-bench-gateway-") as tmp:
        root = Path(tmp)
        with served(root, [sys.executable, "-m", "runtimestate"]) as fleet:
            targets = [
                Target(name="direct", url=fleet.backend_url + "/v1", key="none"),
                Target(
                    name="gateway",
                    url=fleet.gateway + "/v1",
                    key=fleet.key,
                    pid=fleet.service.pid,
                ),
            ]
            results: dict[tuple[str, bool, int], Figures] = {}
            litellm_note = _with_litellm(root, fleet.backend_url, fleet.env, targets, results)
    lines = [
        "## Gateway",
        "",
        "`python -m benchmarks --only gateway`: OpenAI chat completions (32-token answers) from an "
        "aiohttp client in the benchmark process to the emulated vLLM server directly, through "
        "the gateway of `runtimestate serve` (one process, SQLite, one key) and through the "
        f"LiteLLM proxy {LITELLM_VERSION} (one worker, offline, no retries), each for "
        f"{SECONDS[1]:g} s at concurrency 1 and {SECONDS[64]:g} s at 64 after {WARMUP:g} s of "
        "warm-up. Latency is to the last byte, TTFT to the first streamed chunk; CPU is the "
        "service process's user+system time per request. Client, proxies and emulator share "
        "the machine's cores.",
        "",
        *_table(results, "direct"),
        "",
    ]
    if litellm_note:
        lines += [litellm_note, ""]
    # Imported here: the profile module reuses this module's helpers.
    from benchmarks import gateway_profile

    try:
        lines += [gateway_profile.run(), ""]
    except RuntimeError as exc:
        lines += [f"The gateway's profile was not taken: {exc}.", ""]
    return "\n".join(lines)


def _measure(targets: list[Target], results: dict[tuple[str, bool, int], Figures]) -> None:
    for stream in (False, True):
        for concurrency in (1, 64):
            for target in targets:
                results[(target.name, stream, concurrency)] = asyncio.run(
                    _load(target, concurrency=concurrency, stream=stream)
                )


def _with_litellm(
    root: Path,
    backend_url: str,
    env: dict[str, str],
    targets: list[Target],
    results: dict[tuple[str, bool, int], Figures],
) -> str:
    binary = _litellm_python(REQUIREMENTS, root / "litellm-install.log")
    if binary is None:
        _measure(targets, results)
        return "LiteLLM was not measured: its virtual environment could not be installed."
    config = root / "litellm.yaml"
    config.write_text(
        json.dumps(
            {
                "model_list": [
                    {
                        "model_name": MODEL,
                        "litellm_params": {
                            "model": f"openai/{MODEL}",
                            "api_base": backend_url + "/v1",
                            "api_key": "dummy",
                        },
                    }
                ],
                "router_settings": {"routing_strategy": "simple-shuffle"},
                "litellm_settings": {"num_retries": 0, "request_timeout": 60},
                "general_settings": {"master_key": LITELLM_KEY},
            }
        )
    )
    port = _free_port()
    litellm_env = {
        **env,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_OFFLINE_MODE": "true",
        "HF_HUB_OFFLINE": "1",
        "LITELLM_LOG": "ERROR",
    }
    argv = [
        str(binary),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    with _process(argv, env=litellm_env, log=root / "litellm.log") as proxy:
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_http(url + "/health/liveliness", seconds=300)
        except RuntimeError:
            _measure(targets, results)
            return "LiteLLM was not measured: its proxy did not start within 300 s."
        targets.append(
            Target(
                name=f"litellm {LITELLM_VERSION}", url=url + "/v1", key=LITELLM_KEY, pid=proxy.pid
            )
        )
        _measure(targets, results)
    return ""


if __name__ == "__main__":
    print(run())
