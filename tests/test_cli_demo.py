"""The demo fleet and the CLI's renderers, without a service.

The demo must be idempotent across restarts (the emulator comes back on a new port, the
declarations must be reused and moved, never duplicated), on both store engines. The download
board must turn the progress events of the bus into finished and failed bars exactly as the
download cycle publishes them.
"""

from __future__ import annotations

import io

import httpx
from rich.console import Console

from runtimestate.cli.render import print_plan, print_records
from runtimestate.demo import DEMO_MODELS, DEMO_NODES, DOWN_NODE, DOWN_URL, DemoFleet
from runtimestate.store.base import Store


async def test_demo_declares_its_fleet_and_reuses_it_after_a_restart(store: Store) -> None:
    async with DemoFleet(pull_seconds=0.01) as first:
        await first.declare(store)
        first_urls = first.base_urls
        async with httpx.AsyncClient() as http:
            tags = await http.get(f"{first_urls['demo-ollama-3']}/api/tags")
        assert [m["name"] for m in tags.json()["models"]] == ["tinyllama:latest"]
    backends = {b.name: b for b in await store.list_all_backends()}
    assert set(backends) == {*DEMO_NODES, DOWN_NODE}
    assert {name: b.base_url for name, b in backends.items()} == first_urls
    assert backends[DOWN_NODE].base_url == DOWN_URL

    async with DemoFleet(pull_seconds=0.01) as second:
        await second.declare(store)
        second_urls = second.base_urls
    assert second_urls != first_urls, "a restarted emulator listens on a new port"
    after = {b.name: b for b in await store.list_all_backends()}
    assert {name: b.id for name, b in after.items()} == {n: b.id for n, b in backends.items()}
    assert {name: b.base_url for name, b in after.items()} == second_urls
    models = await store.list_all_models()
    assert sorted(m.model for m in models) == sorted(spec.model for spec in DEMO_MODELS)
    embed = next(m for m in models if m.model.startswith("nomic-embed-text"))
    assert embed.can_embed
    assert not embed.can_chat


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=200, color_system=None), buffer


def test_plan_table_lists_pulls_and_deletes() -> None:
    console, buffer = _console()
    print_plan(
        console,
        [
            {
                "backendId": "1",
                "backendName": "node-1",
                "actions": [
                    {"kind": "pull", "model": "qwen2.5:0.5b"},
                    {"kind": "delete", "model": "tinyllama:latest"},
                ],
                "state": {"name": "node-1", "models": ["qwen2.5:0.5b"], "pulledModels": []},
            },
        ],
    )
    row = next(line for line in buffer.getvalue().splitlines() if "node-1" in line)
    assert "qwen2.5:0.5b" in row
    assert "tinyllama:latest" in row
    assert row.count("qwen2.5:0.5b") == 2, "a model still missing is shown as missing too"


def test_names_from_the_service_are_printed_literally_not_as_markup() -> None:
    console, buffer = _console()
    print_records(console, [{"name": "[bold]odd[/bold]"}], [("name", "name")])
    assert "[bold]odd[/bold]" in buffer.getvalue()
