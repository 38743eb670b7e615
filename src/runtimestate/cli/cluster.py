"""``runtimestate cluster``: the replicas the store knows of, and who leads.

One call to ``GET /cluster`` on whichever replica the CLI reaches: that replica's id, role and
the leader with its term, then every registered replica with the age of its heartbeat. A
replica that missed three heartbeats is shown as gone (killed, or cut off from the database):
what an operator looks at during a failover.
"""

from __future__ import annotations

from typing import Any

import typer

from runtimestate.cli import render
from runtimestate.cli.common import JsonFlag, api, out

__all__ = ["cluster"]


def cluster(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """The replicas of the service, their roles, the leader and its term."""
    with api(ctx) as client:
        view = client.get("/cluster")
    if as_json:
        render.print_json(out(), view)
        return
    about: dict[str, Any] = view if isinstance(view, dict) else {}
    snapshot = about.get("snapshot") or {}
    age = snapshot.get("age")
    shown_age = "-" if age is None else f"{age:.1f} s"
    out().print(
        f"this replica: {about.get('instance')} ({about.get('role')}); "
        f"leader: {about.get('leader') or 'none'}, term {about.get('term')}; "
        f"snapshot version {snapshot.get('version', '-')}, age {shown_age}",
        markup=False,
        highlight=False,
    )
    records = [
        {
            **replica,
            "heartbeat": f"{replica.get('heartbeatAge', 0):.1f} s ago",
            "state": "up" if replica.get("alive") else "gone",
        }
        for replica in about.get("replicas") or []
        if isinstance(replica, dict)
    ]
    columns = (
        ("instance", "instance"),
        ("role", "role"),
        ("term", "term"),
        ("state", "state"),
        ("heartbeat", "heartbeat"),
        ("url", "url"),
        ("version", "version"),
    )
    render.print_records(out(), records, columns, empty="no replica registered")
