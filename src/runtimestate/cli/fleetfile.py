"""``apply`` and ``export``: the whole fleet as one file under version control.

``apply FILE`` sends the file as it is to ``POST /fleet/apply``, which validates it (errors
name the file, the line and the field), computes the difference and applies it in one
transaction; this module only prints the answer. ``-`` reads the file from stdin. ``export``
writes the service's declaration as such a file; applying it is a no-op.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from runtimestate.cli import render
from runtimestate.cli.client import ExitCode
from runtimestate.cli.common import JsonFlag, api, fail, out

__all__ = ["apply", "export", "format_plan"]

_SIGN = {"add": "+", "change": "~", "remove": "-"}


def _value(value: Any) -> str:
    return "(empty)" if value == "" else str(value)


def format_plan(plan: dict[str, Any]) -> list[str]:
    """The difference as lines: one per change, then the counts."""
    lines: list[str] = []
    for change in plan.get("changes", []):
        head = f"{_SIGN.get(change['action'], '?')} {change['kind']} {change['name']}"
        fields = change.get("fields") or {}
        if change["action"] == "change":
            detail = ", ".join(
                f"{key}: {_value(old)} -> {_value(new)}" for key, (old, new) in fields.items()
            )
        else:
            detail = " ".join(
                f"{key}={_value(value)}"
                for key, value in fields.items()
                if key not in ("name", "model")
            )
        lines.append(f"{head}  {detail}".rstrip())
    counts = plan.get("counts", {})
    total = f"{counts.get('added', 0)} to add, {counts.get('changed', 0)} to change, "
    total += f"{counts.get('removed', 0)} to remove, {counts.get('unchanged', 0)} unchanged"
    if plan.get("dryRun"):
        summary = f"dry run: {total}; nothing applied"
    elif plan.get("applied"):
        summary = (
            f"applied: {counts.get('added', 0)} added, {counts.get('changed', 0)} changed, "
            f"{counts.get('removed', 0)} removed, {counts.get('unchanged', 0)} unchanged"
        )
    else:
        summary = f"no changes: {counts.get('unchanged', 0)} unchanged; nothing applied"
    undeclared = counts.get("undeclared", 0)
    if undeclared and not plan.get("prune"):
        summary += f" ({undeclared} declared in the service but not in the file, kept; --prune)"
    lines.append(summary)
    return lines


def apply(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="The fleet file (YAML or JSON); - for stdin.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the difference; apply nothing.")
    ] = False,
    prune: Annotated[
        bool, typer.Option("--prune", help="Remove what the file does not declare.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Make the service's declaration what FILE says, in one transaction (all or nothing)."""
    if file == "-":
        content = sys.stdin.buffer.read()
        name = "stdin"
    else:
        try:
            content = Path(file).read_bytes()
        except OSError as exc:
            raise fail(f"cannot read {file}: {exc.strerror or exc}", ExitCode.USAGE) from exc
        name = file
    params: dict[str, str | int] = {"file": name}
    if dry_run:
        params["dryRun"] = "true"
    if prune:
        params["prune"] = "true"
    with api(ctx) as client:
        response = client.request(
            "POST",
            "/fleet/apply",
            content=content,
            headers={"Content-Type": "application/yaml"},
            params=params,
        )
    plan = response.json()
    if as_json:
        render.print_json(out(), plan)
        return
    console = out()
    for line in format_plan(plan):
        console.print(escape(line), highlight=False, soft_wrap=True)


def export(
    ctx: typer.Context,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file, not stdout.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Write the service's declaration as a fleet file (apply of it changes nothing)."""
    with api(ctx) as client:
        params: dict[str, str | int] = {"format": "json" if as_json else "yaml"}
        text = client.request("GET", "/fleet/export", params=params).text
    if output is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise fail(f"cannot write {output}: {exc.strerror or exc}", ExitCode.USAGE) from exc
