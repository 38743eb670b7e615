"""The CLI against a real service: commands, ``--json``, error lines and exit codes, secrets.

One service subprocess (``serve --demo``) serves the whole module, which also checks that the
demo fleet is declared through the startup hook. Commands run in-process through Typer's
``CliRunner`` so the tests see stdout, stderr and the exit code separately; the few checks that
are about the process itself (argv, ``python -m``) run a real subprocess.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from runtimestate.cli import app
from runtimestate.cli.client import ExitCode, resolve_endpoint
from runtimestate.cli.serve import DEMO_DATABASE_FILE
from runtimestate.demo import DEMO_MODELS, DEMO_NODES
from tests.cli_service import ServiceProcess, cli_env, free_port, start_service
from tests.fixtures.polling import eventually_sync


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("cli-service")
    data_dir = root / "data"
    env = cli_env(url="http://unused", data_dir=data_dir)
    proc = start_service(
        data_dir=data_dir,
        log_path=root / "service.log",
        extra=("--demo", "--interval", "0.5", "--demo-pull-seconds", "5"),
        env=env,
    )
    yield proc
    assert proc.stop() == 0, proc.log_tail()


def run(service: ServiceProcess, *args: str, stdin: str | None = None) -> Result:
    runner = CliRunner()
    env = cli_env(url=service.url, data_dir=service.data_dir)
    return runner.invoke(app, list(args), env=env, input=stdin, catch_exceptions=False)


def run_json(service: ServiceProcess, *args: str) -> Any:
    result = run(service, *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def assert_one_line_error(result: Result, code: ExitCode, *fragments: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# ---- endpoint resolution (no service needed) ------------------------------------------------
def test_token_comes_from_flag_then_env_then_local_token_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("from-file\n")
    monkeypatch.setenv("RUNTIMESTATE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("RUNTIMESTATE_TOKEN", raising=False)
    monkeypatch.delenv("RUNTIMESTATE_URL", raising=False)
    assert resolve_endpoint(url=None, token=None).token == "from-file"
    monkeypatch.setenv("RUNTIMESTATE_TOKEN", "from-env")
    assert resolve_endpoint(url=None, token=None).token == "from-env"
    assert resolve_endpoint(url=None, token="from-flag").token == "from-flag"
    monkeypatch.delenv("RUNTIMESTATE_TOKEN")
    # A remote service never gets the local token file's secret.
    assert resolve_endpoint(url="https://fleet.example.com", token=None).token is None


def test_unreachable_service_is_one_line_and_exit_code_3() -> None:
    port = free_port()
    result = CliRunner().invoke(
        app, ["--url", f"http://127.0.0.1:{port}", "backend", "list"], catch_exceptions=False
    )
    assert_one_line_error(result, ExitCode.UNREACHABLE, f"127.0.0.1:{port}", "runtimestate serve")


@pytest.mark.parametrize(
    "url", ["ftp://x", "http://127.0.0.1:abc", "http://127.0.0.1:99999", "http://[::1"]
)
def test_invalid_service_url_is_a_usage_error(url: str) -> None:
    result = CliRunner().invoke(app, ["--url", url, "state"], catch_exceptions=False)
    assert_one_line_error(result, ExitCode.USAGE, url)


def test_unreadable_token_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "token").mkdir()
    result = CliRunner().invoke(
        app,
        ["--url", f"http://127.0.0.1:{free_port()}", "backend", "list"],
        env={"RUNTIMESTATE_DATA_DIR": str(tmp_path), "RUNTIMESTATE_TOKEN": ""},
        catch_exceptions=False,
    )
    assert_one_line_error(result, ExitCode.USAGE, str(tmp_path / "token"))


def test_serve_rejects_a_bad_setting_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["serve", "--data-dir", str(tmp_path), "--log-format", "xml"],
        catch_exceptions=False,
    )
    assert_one_line_error(result, ExitCode.USAGE, "log_format")


def test_serve_on_a_busy_port_fails_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "runtimestate", "serve", "--port", str(port)],
            env=cli_env(url="http://unused", data_dir=tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == ExitCode.FAILURE
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert str(port) in errors[0]
    assert "Traceback" not in done.stderr


# ---- against the running demo service ------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps")
def test_serve_runs_on_uvloop_with_the_httptools_parser(service: ServiceProcess) -> None:
    # The C halves of the gateway's hot path, seen from outside: the libraries the running
    # process has mapped (uvloop only once its loop is made; httptools once uvicorn chose it).
    mapped = Path(f"/proc/{service.proc.pid}/maps").read_text()
    assert "uvloop" in mapped
    assert "httptools" in mapped


def test_demo_fleet_is_declared_through_the_startup_hook(service: ServiceProcess) -> None:
    backends = run_json(service, "backend", "list")
    assert {b["name"] for b in backends} >= set(DEMO_NODES)
    assert all(b["type"] == "ollama" for b in backends if b["name"] in DEMO_NODES)
    models = {m["model"] for m in run_json(service, "model", "list")}
    assert models >= {spec.model for spec in DEMO_MODELS}
    # The demo declares into its own database, never into the operator's real one.
    assert (service.data_dir / DEMO_DATABASE_FILE).exists()
    assert not (service.data_dir / "runtimestate.db").exists()


def test_watch_json_prints_demo_progress_events(service: ServiceProcess) -> None:
    result = run(service, "watch", "--json", "--timeout", "4")
    assert result.exit_code == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert events, f"no progress within 4 s\n{service.log_tail()}"
    assert all({"status", "model", "baseUrl"} <= event.keys() for event in events)


def test_watch_renders_progress_bars(service: ServiceProcess) -> None:
    result = run(service, "watch", "--timeout", "4")
    assert result.exit_code == 0, result.stderr
    assert " on demo-ollama-" in result.stdout
    lines = [line for line in result.stdout.splitlines() if " on demo-ollama-" in line]
    assert not any(" bytes" in line for line in lines), "sizes in units, never '115/115 bytes'"


def test_watch_waits_for_a_service_that_is_down_with_one_status_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    env = cli_env(url=url, data_dir=tmp_path, RUNTIMESTATE_TOKEN="t0ken-for-nothing")
    result = CliRunner().invoke(app, ["watch", "--timeout", "3.5"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.stdout + result.stderr
    status = [line for line in result.stdout.splitlines() if "reconnecting" in line]
    assert len(status) == 1, result.stdout
    assert f"cannot reach the service at {url}" in status[0]
    # Backoff: the first attempt waits 1 s, the second 2 s: in 3.5 s, two or three attempts
    # (not one per second), and the status line was redrawn, never repeated.
    attempt = re.search(r"reconnecting in \d+ s \(attempt (\d+)\)", status[0])
    assert attempt is not None, status[0]
    assert 2 <= int(attempt.group(1)) <= 3


def test_ctrl_c_ends_watch_with_status_130(tmp_path: Path) -> None:
    env = cli_env(
        url=f"http://127.0.0.1:{free_port()}",
        data_dir=tmp_path,
        RUNTIMESTATE_TOKEN="t0ken-for-nothing",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtimestate", "watch", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # Interrupt it once it waits to reconnect, as an operator would.
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert b"reconnecting" in first, first
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=20)
        stderr = first + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr.decode()
    assert b"Traceback" not in stderr


def test_provider_status_shows_each_fact_once(service: ServiceProcess) -> None:
    result = run(service, "provider", "status")
    assert result.exit_code == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if "provider" in line)
    words = header.replace("│", " ").replace("┃", " ").split()
    assert words == ["provider", "key", "stored", "backends", "healthy", "models", "error"]
    rows = [line for line in result.stdout.splitlines() if "openai" in line or "gemini" in line]
    assert all(line.count("openai") + line.count("gemini") == 1 for line in rows), rows


def test_backend_add_list_show_rm_by_name(service: ServiceProcess) -> None:
    name = unique("node")
    added = run(service, "backend", "add", name, f"http://10.9.9.9:11434/{name}", "--json")
    assert added.exit_code == 0, added.stderr
    created = json.loads(added.stdout)
    assert created["name"] == name
    assert {"id", "baseUrl", "type", "createdAt", "updatedAt"} <= created.keys()

    listed = run(service, "backend", "list")
    assert listed.exit_code == 0
    assert name in listed.stdout

    shown = run_json(service, "backend", "show", name)
    assert shown["id"] == created["id"]
    assert shown["pools"] == []

    removed = run(service, "backend", "rm", name)
    assert removed.exit_code == 0, removed.stderr
    assert name not in {b["name"] for b in run_json(service, "backend", "list")}


def test_duplicate_backend_is_a_conflict(service: ServiceProcess) -> None:
    name = unique("dup")
    assert run(service, "backend", "add", name, f"http://10.9.9.8/{name}").exit_code == 0
    again = run(service, "backend", "add", name, f"http://10.9.9.8/{name}-other")
    assert_one_line_error(again, ExitCode.CONFLICT)


def test_invalid_input_names_the_field(service: ServiceProcess) -> None:
    bad_type = run(service, "backend", "add", unique("bad"), "http://10.1.1.1", "--type", "tpu")
    assert_one_line_error(bad_type, ExitCode.INVALID_INPUT, "type")
    bad_url = run(service, "backend", "add", unique("bad"), "not a url")
    assert_one_line_error(bad_url, ExitCode.INVALID_INPUT, "field:")


def test_missing_things_are_not_found(service: ServiceProcess) -> None:
    assert_one_line_error(run(service, "backend", "rm", "no-such-node"), ExitCode.NOT_FOUND)
    assert_one_line_error(run(service, "model", "rm", "no-such:model"), ExitCode.NOT_FOUND)
    assert_one_line_error(run(service, "pool", "rm", "no-such-pool"), ExitCode.NOT_FOUND)


def test_wrong_token_is_unauthorized(service: ServiceProcess) -> None:
    result = run(service, "--token", "wrong-token-123456", "backend", "list")
    assert_one_line_error(result, ExitCode.UNAUTHORIZED, "token")
    assert "wrong-token-123456" not in result.stderr + result.stdout


def test_model_add_with_capabilities_and_rm(service: ServiceProcess) -> None:
    name = f"{unique('m')}:7b"
    created = run_json(service, "model", "add", name, "-c", "4096", "--chat", "--stream")
    assert created["model"] == name
    assert created["contextLength"] == 4096
    assert (created["canChat"], created["canStream"]) == (True, True)
    assert (created["canEmbed"], created["canPrompt"]) == (False, False)
    assert run(service, "model", "rm", name).exit_code == 0
    assert name not in {m["model"] for m in run_json(service, "model", "list")}


def test_pool_assign_and_unassign_backend_and_model(service: ServiceProcess) -> None:
    pool, node, model = unique("pool"), unique("pnode"), f"{unique('pm')}:1b"
    assert run(service, "pool", "add", pool, "--purpose", "chat").exit_code == 0
    assert run(service, "backend", "add", node, f"http://10.2.2.2/{node}").exit_code == 0
    assert run(service, "model", "add", model).exit_code == 0

    assigned = run(service, "pool", "assign", pool, "--backend", node, "--model", model)
    assert assigned.exit_code == 0, assigned.stderr
    assert [p["name"] for p in run_json(service, "backend", "show", node)["pools"]] == [pool]
    assert pool in {p["name"] for p in run_json(service, "pool", "list")}

    twice = run(service, "pool", "assign", pool, "--backend", node)
    assert_one_line_error(twice, ExitCode.CONFLICT)

    assert run(service, "pool", "unassign", pool, "--backend", node).exit_code == 0
    assert run_json(service, "backend", "show", node)["pools"] == []
    assert run(service, "pool", "unassign", pool, "--model", model).exit_code == 0
    assert run(service, "pool", "rm", pool).exit_code == 0
    nothing = run(service, "pool", "assign", pool, "--backend", node)
    assert_one_line_error(nothing, ExitCode.NOT_FOUND)


def test_pool_assign_needs_a_target(service: ServiceProcess) -> None:
    assert_one_line_error(run(service, "pool", "assign", "any"), ExitCode.USAGE)


def test_provider_key_is_read_from_stdin_and_never_echoed(service: ServiceProcess) -> None:
    key = "sk-test-cli0123456789abcdef"
    result = run(service, "provider", "configure", "openai", stdin=key + "\n")
    assert result.exit_code == 0, result.stderr
    assert key not in result.stdout + result.stderr
    assert key[-4:] in result.stdout  # the masked form, so the operator can tell keys apart
    status = run_json(service, "provider", "status", "openai")
    assert status[0]["provider"] == "openai"
    assert key not in json.dumps(status)


def test_provider_key_is_refused_on_the_command_line(service: ServiceProcess) -> None:
    result = run(service, "provider", "configure", "openai", "sk-test-argv0123456789")
    assert result.exit_code == ExitCode.USAGE
    assert "sk-test-argv0123456789" not in result.stdout


def test_empty_provider_key_is_refused(service: ServiceProcess) -> None:
    result = run(service, "provider", "configure", "gemini", stdin="\n")
    assert_one_line_error(result, ExitCode.USAGE, "no API key")


def test_undecodable_provider_key_is_one_line(service: ServiceProcess) -> None:
    # Bytes that are not UTF-8, piped in as a real process would (its stdin decodes them with
    # surrogateescape under a C locale, or fails under a UTF-8 one): one line either way.
    done = subprocess.run(
        [sys.executable, "-m", "runtimestate", "provider", "configure", "openai"],
        env=cli_env(url=service.url, data_dir=service.data_dir),
        input=b"sk-\xff\xfe0123456789abcdef\n",
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert done.stderr.decode().strip() == "error: the API key is not UTF-8 text"


def test_state_plan_sync_and_queue_render_and_parse(service: ServiceProcess) -> None:

    def observed() -> list[dict[str, Any]] | None:
        entries = run_json(service, "state")
        # One shape: an array of LLMState objects, ordered by backend name.
        assert isinstance(entries, list), entries
        names = [entry["name"] for entry in entries]
        assert names == sorted(names), names
        return entries if set(names) >= set(DEMO_NODES) else None

    eventually_sync(observed, what=lambda: f"the demo nodes observed\n{service.log_tail()}")
    table = run(service, "state")
    assert table.exit_code == 0, table.stderr
    # One replica: the header gives the snapshot's age and names no leader.
    assert re.match(r"\d+ backends, snapshot confirmed \d+ (s|min) ago\n", table.stdout), (
        table.stdout
    )
    for node in DEMO_NODES:
        assert node in table.stdout
    assert "ollama" in table.stdout

    assert run(service, "plan").exit_code == 0
    run_json(service, "plan")
    synced = run(service, "sync")
    assert synced.exit_code == 0, synced.stderr
    assert DEMO_NODES[0] in synced.stdout
    queue = run_json(service, "queue", "list")
    assert isinstance(queue, list), queue
    assert all({"url", "model", "backendId", "status"} <= set(task) for task in queue), queue
    assert run(service, "queue", "list").exit_code == 0


def test_queue_cancel_needs_exactly_one_target(service: ServiceProcess) -> None:
    assert_one_line_error(run(service, "queue", "cancel"), ExitCode.USAGE)
    both = run(service, "queue", "cancel", "m", "--backend", DEMO_NODES[0])
    assert_one_line_error(both, ExitCode.USAGE)


def test_python_dash_m_runs_the_cli_without_traceback(service: ServiceProcess) -> None:
    env = cli_env(url=service.url, data_dir=service.data_dir)
    done = subprocess.run(
        [sys.executable, "-m", "runtimestate", "backend", "show", "absent-node"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == ExitCode.NOT_FOUND
    assert done.stderr.strip().count("\n") == 0
    assert "Traceback" not in done.stderr
