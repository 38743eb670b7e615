"""What ``watch`` and ``state`` print, read as an operator reads it: rendered at 80 columns.

The views are fed the service's JSON and progress events directly (no service), with the
clock under the test's control, and the assertions are on the rendered text: one line per pull
with the whole model's bytes, speed and time left; a summary line when a pull ends; the idle
and reconnecting lines; a state table whose status words mean one thing each and whose names
are cut with an ellipsis, never broken mid-word, unless ``--wide``.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console, RenderableType

from runtimestate.api.schemas import ClusterOut, ReplicaOut, SnapshotInfoOut
from runtimestate.cli.live import WatchBoard, format_bytes, is_failure_status
from runtimestate.cli.observe import _snapshot_info
from runtimestate.cli.render import SnapshotInfo, print_state, status_word

URL_A, URL_B = "http://h/ollama/node-a", "http://h/ollama/node-b"
NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)


def render(value: RenderableType | None = None, *, width: int = 80) -> list[str]:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None)
    if value is not None:
        console.print(value)
    return buffer.getvalue().splitlines()


class Ticks:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def layer(model: str, url: str, digest: str, total: int, completed: int) -> dict[str, Any]:
    return {
        "status": f"pulling {digest}",
        "digest": f"sha256:{digest}",
        "total": total,
        "completed": completed,
        "model": model,
        "baseUrl": url,
    }


def test_one_line_per_pull_with_the_whole_models_bytes_speed_and_eta() -> None:
    ticks = Ticks()
    board = WatchBoard(backend_names={URL_A: "node-a"}, clock=ticks)
    board.update({"status": "pulling manifest", "model": "llama3.2:1b", "baseUrl": URL_A})
    # One layer finishes first; the next one then moves. A per-layer bar would restart at 0
    # and show only the current layer; the line must show the whole model's bytes.
    board.update(layer("llama3.2:1b", URL_A, "aaaa", 100_000_000, 100_000_000))
    board.update(layer("llama3.2:1b", URL_A, "bbbb", 500_000_000, 0))
    ticks.now += 10
    board.update(layer("llama3.2:1b", URL_A, "bbbb", 500_000_000, 200_000_000))
    lines = render(board)
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("llama3.2:1b on node-a")
    assert "300 MB/600 MB" in line
    assert "20 MB/s" in line
    assert "ETA 15 s" in line
    assert len(line) <= 80


def test_a_finished_pull_leaves_one_summary_and_the_idle_line_counts() -> None:
    ticks = Ticks()
    board = WatchBoard(backend_names={URL_A: "node-a", URL_B: "node-b"}, clock=ticks)
    board.update(layer("m1", URL_A, "aaaa", 600_000_000, 0))
    board.update({"status": "pulling manifest", "model": "m2", "baseUrl": URL_B})
    ticks.now += 40
    board.update(layer("m1", URL_A, "aaaa", 600_000_000, 600_000_000))
    done = board.update({"status": "success", "model": "m1", "baseUrl": URL_A})
    assert render(done) == ["done    m1 on node-a: 600 MB in 40 s"]
    assert all("m1" not in line for line in render(board)), "a finished pull disappears"
    failed = board.update(
        {
            "status": "error: pull model manifest: file does not exist",
            "model": "m2",
            "baseUrl": URL_B,
        },
        next_try="12:05:00",
    )
    assert render(failed, width=200) == [
        "failed  m2 on node-b: error: pull model manifest: file does not exist; next try 12:05:00"
    ]
    board.queued = 3
    assert render(board) == ["no pull running; 3 queued, 1 failed"]


def test_a_cancelled_pull_is_not_counted_as_failed() -> None:
    board = WatchBoard(backend_names={URL_A: "node-a"})
    board.update({"status": "pulling manifest", "model": "m1", "baseUrl": URL_A})
    board.update({"status": "cancelled", "model": "m1", "baseUrl": URL_A})
    assert board.failed == 0
    assert is_failure_status("cancelled")
    assert not is_failure_status("success")


def test_reconnecting_is_one_status_line_under_the_pulls() -> None:
    board = WatchBoard()
    board.status = "cannot reach the service at http://h:8080; reconnecting in 4 s (attempt 3)"
    assert render(board) == [
        "no pull running; 0 queued, 0 failed",
        "cannot reach the service at http://h:8080; reconnecting in 4 s (attempt 3)",
    ]


def test_long_names_are_cut_with_an_ellipsis_in_watch() -> None:
    board = WatchBoard(backend_names={URL_A: "a-node-with-a-very-long-name-in-rack-42"})
    model = "hf.co/some-organisation/an-extremely-long-model-name-GGUF:Q4_K_M"
    board.update(layer(model, URL_A, "aaaa", 1_000_000, 10))
    (line,) = render(board)
    assert len(line) <= 80
    assert "…" in line


def backend(name: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": name,
        "name": name,
        "backend": {"type": "ollama", "baseUrl": f"http://h/{name}"},
        "models": [],
        "pulledModels": [],
        "observedAt": (NOW - timedelta(seconds=3)).isoformat(),
        **fields,
    }


SNAPSHOT = [
    backend(
        "ok-node",
        models=["llama3"],
        pulledModels=[{"name": "llama3:latest", "model": "llama3:latest"}],
    ),
    backend("busy-node", models=["llama3"]),
    backend(
        "sad-node",
        models=["llama3", "private/finetune:v1"],
        pulledModels=[{"model": "llama3:latest"}],
        downloads=[
            {
                "model": "private/finetune:v1",
                "status": "failed",
                "attempts": 3,
                "lastError": "pull model manifest: file does not exist",
                "nextAttemptAt": "2026-11-29T12:05:00Z",
            }
        ],
    ),
    backend("down-node", models=["llama3"], error="cannot connect to http://h/down-node"),
    backend(
        "a-backend-name-that-is-far-too-long-for-one-column-of-an-80-column-terminal",
        models=["llama3"],
    ),
]


def test_status_words_mean_one_thing_each() -> None:
    words = {entry["name"]: status_word(entry) for entry in SNAPSHOT}
    assert words["ok-node"] == "ok"
    assert words["busy-node"] == "pulling"
    assert words["sad-node"] == "failing", "a failing pull is not 'pulling'"
    assert words["down-node"] == "error"


def state_lines(*, wide: bool = False, **extra: Any) -> list[str]:
    buffer = io.StringIO()
    console = Console(file=buffer, width=80, color_system=None)
    print_state(console, SNAPSHOT, now=NOW, wide=wide, **extra)
    return buffer.getvalue().splitlines()


def test_state_fits_80_columns_with_age_failed_pulls_and_unmanaged() -> None:
    lines = state_lines(
        unmanaged=[{"id": "x", "name": "spare-node", "type": "vllm"}],
        snapshot_info=SnapshotInfo(age=4.2, leader="replica-a", replicas=3),
    )
    assert lines[0] == "5 backends, snapshot confirmed 4 s ago (leader replica-a, 3 replicas alive)"
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    by_name = {line.split()[0]: line for line in lines[1:] if line.strip()}
    assert " ok " in by_name["ok-node"]
    assert " pulling " in by_name["busy-node"]
    assert " failing " in by_name["sad-node"]
    assert " error " in by_name["down-node"]
    assert " unmanaged " in by_name["spare-node"]
    # The failed pull is listed right under its backend, with attempts and reason.
    sad = next(i for i, line in enumerate(lines) if line.startswith("sad-node"))
    failed = lines[sad + 1]
    assert "private/finetune" in failed
    assert "failed" in failed
    assert "attempt 3" in failed
    # A long name is cut with an ellipsis, on one line, not broken mid-word onto the next.
    long_line = next(line for line in lines if line.startswith("a-backend-name"))
    assert "…" in long_line
    assert not any(line.strip().startswith("column") for line in lines)


def test_state_wide_shows_every_name_whole() -> None:
    lines = state_lines(wide=True)
    assert any(
        "a-backend-name-that-is-far-too-long-for-one-column-of-an-80-column-terminal" in line
        for line in lines
    )
    assert not any("…" in line for line in lines)


def test_one_replica_names_no_leader_and_no_age_falls_back_to_the_last_change() -> None:
    alone = state_lines(snapshot_info=SnapshotInfo(age=75.0, leader="host", replicas=1))
    assert alone[0] == "5 backends, snapshot confirmed 75 s ago"
    assert state_lines()[0] == "5 backends, last change observed 3 s ago"


class ClusterClient:
    """The one call ``state`` makes for its header, answered with ``GET /cluster``'s JSON."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def get(self, path: str) -> Any:
        assert path == "/cluster"
        return self.body


def test_the_header_reads_the_clusters_json() -> None:
    def replica(name: str, *, alive: bool) -> ReplicaOut:
        return ReplicaOut(
            instance=name, role="follower", heartbeat_age=1.0, heartbeat_at=NOW, alive=alive
        )

    cluster = ClusterOut(
        instance="replica-b",
        role="follower",
        term=4,
        leader="replica-a",
        snapshot=SnapshotInfoOut(version=9, age=2.4),
        replicas=[
            replica("replica-a", alive=True),
            replica("replica-b", alive=True),
            replica("replica-c", alive=False),
        ],
    )
    body = json.loads(cluster.model_dump_json(by_alias=True))
    info = _snapshot_info(ClusterClient(body))  # type: ignore[arg-type]
    assert info == SnapshotInfo(age=2.4, leader="replica-a", replicas=2)
    buffer = io.StringIO()
    print_state(Console(file=buffer, width=80), SNAPSHOT, now=NOW, snapshot_info=info)
    assert buffer.getvalue().splitlines()[0] == (
        "5 backends, snapshot confirmed 2 s ago (leader replica-a, 2 replicas alive)"
    )


def test_state_without_observation_times_says_so() -> None:
    buffer = io.StringIO()
    entry = {key: value for key, value in SNAPSHOT[0].items() if key != "observedAt"}
    print_state(Console(file=buffer, width=80, color_system=None), [entry], now=NOW)
    assert buffer.getvalue().splitlines()[0] == (
        "1 backend, observation time not reported by this service"
    )


def test_bytes_are_decimal_units() -> None:
    assert format_bytes(1_700) == "1.7 kB"
    assert format_bytes(600_000_000) == "600 MB"
    assert format_bytes(115) == "115 B"
