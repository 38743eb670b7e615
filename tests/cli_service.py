"""Running ``runtimestate serve`` as a real subprocess for the CLI and end-to-end tests.

The CLI's contract is the HTTP API of a real service, so its tests start one exactly as an
operator would - ``python -m runtimestate serve`` on a free loopback port with a private data
directory - and talk to it over sockets. The service's output goes to a log file whose tail is
put into every failure message, because a service that died at startup is otherwise a mystery.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.fixtures.polling import eventually_sync

__all__ = [
    "ServiceProcess",
    "cli_env",
    "free_port",
    "restartable_port",
    "serve_argv",
    "start_service",
]

STARTUP_TIMEOUT = 60.0  # a loaded machine (2 cores, many test runs) starts slowly


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def restartable_port() -> int:
    """A free port outside the kernel's ephemeral range.

    A service restarted on the port it had must find it free again; a port from the ephemeral
    range may meanwhile be taken as the local end of any outgoing connection (to PostgreSQL,
    NATS, the emulator), so the port is chosen below that range.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def cli_env(*, url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment a CLI call needs to find the service and its generated token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNTIMESTATE_")}
    env.update({"RUNTIMESTATE_URL": url, "RUNTIMESTATE_DATA_DIR": str(data_dir), **extra})
    env["COLUMNS"] = "200"
    return env


def serve_argv(*, port: int, data_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "runtimestate",
        "serve",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        *extra,
    ]


@dataclass(kw_only=True)
class ServiceProcess:
    """A service subprocess and how to reach it."""

    url: str
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no service log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait; a service that ignores it is killed and the test fails."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"service ignored SIGTERM for {timeout}s\n{self.log_tail()}"
                ) from None
        return self.proc.returncode


def start_service(
    *,
    data_dir: Path,
    log_path: Path,
    extra: tuple[str, ...] = (),
    env: dict[str, str],
    port: int | None = None,
) -> ServiceProcess:
    """Start the service (on ``port``, else a free one) and return once ``/health`` is 200."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            serve_argv(port=port, data_dir=data_dir, extra=extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    service = ServiceProcess(url=url, data_dir=data_dir, log_path=log_path, proc=proc, env=env)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(
                f"service exited with {proc.returncode} at startup\n{service.log_tail()}"
            )
        return httpx.get(f"{url}/health", timeout=1.0).status_code == 200

    try:
        eventually_sync(
            healthy,
            what=lambda: f"the service healthy\n{service.log_tail()}",
            within=STARTUP_TIMEOUT,
            every=0.1,
            ignore=(httpx.TransportError,),
        )
    except AssertionError:
        service.stop()
        raise
    return service
