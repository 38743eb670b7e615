"""``runtimestate apply`` and ``export`` against a real service: the printed difference, the
round trip through a file, and errors that name the file, the line and the field."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from typer.testing import CliRunner, Result

from runtimestate.cli import app
from runtimestate.cli.client import ExitCode
from runtimestate.settings import read_token
from tests.cli_service import ServiceProcess, cli_env, start_service

FLEET = """\
backends:
  - name: gpu-1
    baseUrl: http://10.0.0.1:11434
    type: ollama
  - name: gpu-2
    baseUrl: http://10.0.0.2:11434
    type: ollama
models:
  - model: llama3.2:1b
    contextLength: 8192
    canChat: true
pools:
  - name: chat
    purposeType: chat
    backends: [gpu-1, gpu-2]
    models: [llama3.2:1b]
"""


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("cli-fleet")
    data_dir = root / "data"
    env = cli_env(url="http://unused", data_dir=data_dir)
    proc = start_service(
        data_dir=data_dir, log_path=root / "service.log", extra=("--interval", "60"), env=env
    )
    yield proc
    assert proc.stop() == 0, proc.log_tail()


def run(service: ServiceProcess, *args: str) -> Result:
    env = cli_env(url=service.url, data_dir=service.data_dir)
    return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)


def backends_of(service: ServiceProcess) -> dict[str, str]:
    """name -> base URL, read through the CRUD route (not the fleet routes under test)."""
    headers = {"Authorization": f"Bearer {read_token(service.data_dir)}"}
    response = httpx.get(f"{service.url}/backends", headers=headers, params={"limit": 1000})
    assert response.status_code == 200, response.text
    listed = response.json()
    return {item["name"]: item["baseUrl"] for item in listed}


def test_dry_run_apply_again_export_and_prune(service: ServiceProcess, tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET)

    dry = run(service, "apply", str(path), "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert "+ backend gpu-1  baseUrl=http://10.0.0.1:11434 type=ollama" in lines
    assert "+ pool-backend chat/gpu-2" in lines
    assert lines[-1] == "dry run: 7 to add, 0 to change, 0 to remove, 0 unchanged; nothing applied"
    assert backends_of(service) == {}

    done = run(service, "apply", str(path))
    assert done.exit_code == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "applied: 7 added, 0 changed, 0 removed, 0 unchanged"
    assert done.stdout.splitlines()[:-1] == lines[:-1]
    assert backends_of(service) == {
        "gpu-1": "http://10.0.0.1:11434",
        "gpu-2": "http://10.0.0.2:11434",
    }

    again = run(service, "apply", str(path))
    assert again.stdout.splitlines() == ["no changes: 7 unchanged; nothing applied"]

    exported = tmp_path / "exported.yaml"
    assert run(service, "export", "-o", str(exported)).exit_code == 0
    assert "name: gpu-1" in exported.read_text()
    round_trip = run(service, "apply", str(exported), "--prune", "--json")
    assert round_trip.exit_code == 0
    assert json.loads(round_trip.stdout)["changes"] == []

    path.write_text(FLEET.replace("http://10.0.0.2:11434", "http://10.0.0.3:11434"))
    changed = run(service, "apply", str(path), "--dry-run")
    assert changed.stdout.splitlines()[0] == (
        "~ backend gpu-2  baseUrl: http://10.0.0.2:11434 -> http://10.0.0.3:11434"
    )
    only_one = tmp_path / "one.yaml"
    only_one.write_text(FLEET.split("  - name: gpu-2")[0])
    kept = run(service, "apply", str(only_one))
    assert kept.stdout.splitlines() == [
        "no changes: 1 unchanged; nothing applied "
        "(6 declared in the service but not in the file, kept; --prune)"
    ]
    assert "gpu-2" in backends_of(service)
    pruned = run(service, "apply", str(only_one), "--prune")
    assert pruned.exit_code == 0, pruned.stderr
    assert "- backend gpu-2" in pruned.stdout.splitlines()
    assert "- model llama3.2:1b" in pruned.stdout.splitlines()
    assert backends_of(service) == {"gpu-1": "http://10.0.0.1:11434"}


def test_an_invalid_file_is_one_error_line_with_file_line_and_field(
    service: ServiceProcess, tmp_path: Path
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(FLEET.replace("contextLength: 8192", "contextLength: lots"))
    before = backends_of(service)
    result = run(service, "apply", str(path))
    assert result.exit_code == ExitCode.INVALID_INPUT
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {path}:10: models[0].contextLength: Input should be")
    assert line.endswith("(field: models[0].contextLength)")
    assert backends_of(service) == before

    missing = run(service, "apply", str(tmp_path / "nope.yaml"))
    assert missing.exit_code == ExitCode.USAGE
    assert "cannot read" in missing.stderr


def test_state_watch_prints_the_snapshot_then_each_change(service: ServiceProcess) -> None:
    headers = {"Authorization": f"Bearer {read_token(service.data_dir)}"}

    def declare_and_sync(port: int) -> None:
        dead = f"backends:\n  - name: dead-node\n    baseUrl: http://127.0.0.1:{port}\n"
        dead += "    type: ollama\n"
        applied = httpx.post(
            f"{service.url}/fleet/apply",
            params={"prune": "true"},
            content=dead,
            headers=headers,
            timeout=30,
        )
        assert applied.status_code == 200, applied.text
        synced = httpx.post(f"{service.url}/state/sync", headers=headers, timeout=30)
        assert synced.status_code == 200

    declare_and_sync(9)
    done: list[Result] = []
    watcher = threading.Thread(
        target=lambda: done.append(
            run(service, "state", "--watch", "--json", "--changes", "1", "--timeout", "60")
        )
    )
    watcher.start()
    # Whenever the watch connected, a later change reaches it: keep changing the backend (its
    # URL alternates) until the watch has seen one and returned.
    for round_ in range(60):
        declare_and_sync(10 + round_ % 2)
        watcher.join(0.5)
        if not watcher.is_alive():
            break
    watcher.join(60)
    (result,) = done
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [entry["name"] for entry in lines[0]["snapshot"]] == ["dead-node"]
    assert len(lines) == 2
    assert lines[1]["state"]["name"] == "dead-node"
    assert lines[1]["status"] == "error"
    assert lines[1]["state"]["backend"]["baseUrl"] in ("http://127.0.0.1:10", "http://127.0.0.1:11")


class ResumableStream(http.server.BaseHTTPRequestHandler):
    """``GET /state/events`` that drops the first connection after one change and records the
    ``Last-Event-ID`` every connection arrives with: what the CLI resumes from is read here,
    at the server, not from the CLI."""

    resumed_from: ClassVar[list[str | None]] = []
    done: ClassVar[threading.Event] = threading.Event()

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        self.resumed_from.append(self.headers.get("Last-Event-ID"))
        entry = {"id": "b1", "name": "node-1", "error": ""}
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if len(self.resumed_from) == 1:
            frames = [
                ("7", "snapshot", [entry]),
                ("7.1", "change", {"status": "pulling", "state": entry}),
                ("", "summary", {"backends": 1}),
            ]
        else:
            frames = [("7.2", "change", {"status": "ok", "state": entry})]
        for event_id, name, data in frames:
            head = f"id: {event_id}\n" if event_id else ""
            self.wfile.write(f"{head}event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()
        if len(self.resumed_from) > 1:
            # Held open: the watch must end on its change count, not on the stream's end.
            self.done.wait(30)


def test_state_watch_resumes_from_the_last_event_after_the_stream_drops(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ResumableStream)
    ResumableStream.resumed_from = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = cli_env(
            url=f"http://127.0.0.1:{server.server_port}",
            data_dir=tmp_path,
            **{"RUNTIMESTATE_TOKEN": "watch-token-0123456789"},
        )
        result = CliRunner().invoke(
            app,
            ["state", "--watch", "--json", "--changes", "2", "--timeout", "60"],
            env=env,
            catch_exceptions=False,
        )
    finally:
        ResumableStream.done.set()
        server.shutdown()
        server.server_close()
    assert result.exit_code == 0, result.stderr
    assert ResumableStream.resumed_from == [None, "7.1"]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line.get("status") for line in lines] == [None, "pulling", "ok"]
    assert "snapshot" in lines[0]
    assert "reconnecting" in result.stderr


def test_secrets_set_from_stdin_then_a_fleet_file_names_them(
    service: ServiceProcess, tmp_path: Path
) -> None:
    value = "sk-cli-named-0123456789abcdef"
    env = cli_env(url=service.url, data_dir=service.data_dir)
    runner = CliRunner()
    empty = runner.invoke(app, ["secrets", "set", "cli-key"], input="", env=env)
    assert empty.exit_code == ExitCode.USAGE
    made = runner.invoke(app, ["secrets", "set", "cli-key"], input=value + "\n", env=env)
    assert made.exit_code == 0, made.stderr
    assert value not in made.stdout + made.stderr
    fleet = tmp_path / "secret.yaml"
    fleet.write_text(
        "backends:\n  - name: cli-vllm\n    baseUrl: http://10.0.9.1:8000\n"
        "    type: vllm\n    apiKeySecret: cli-key\n"
    )
    applied = run(service, "apply", str(fleet))
    assert applied.exit_code == 0, applied.stderr
    listed = run(service, "secrets", "list", "--json")
    (entry,) = [s for s in json.loads(listed.stdout) if s["name"] == "cli-key"]
    assert entry["value"] == "****cdef"
    assert len(entry["usedBy"]) == 1
    assert value not in listed.stdout
    table = run(service, "secrets", "list")
    assert "cli-key" in table.stdout
    assert "****cdef" in table.stdout
    refused = run(service, "secrets", "rm", "cli-key")
    assert refused.exit_code == ExitCode.CONFLICT
    assert "cli-key" in refused.stderr
