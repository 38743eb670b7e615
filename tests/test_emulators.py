"""The Ollama emulator and the shared server: shapes, status codes, the pull stream, faults.

Everything goes over real loopback sockets with plain httpx, so these tests pin the wire format
itself; ``test_emulators_clients.py`` checks the same server against the official clients.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from runtimestate import testing
from runtimestate.clock import FakeClock
from runtimestate.testing import (
    Emulator,
    EmulatorThread,
    GeminiAccount,
    OllamaNode,
    normalize_model_name,
)
from runtimestate.testing.ollama_models import InvalidModelName
from tests.fixtures.polling import eventually

HEX64 = re.compile(r"^[0-9a-f]{64}$")


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def pull_lines(http: httpx.AsyncClient, node: OllamaNode, model: str) -> list[dict[str, Any]]:
    async with http.stream("POST", f"{node.base_url}/api/pull", json={"model": model}) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"] == "application/x-ndjson"
        return [json.loads(line) async for line in reply.aiter_lines() if line]


async def drain(
    http: httpx.AsyncClient, url: str, body: dict[str, Any], *, read_timeout: float
) -> list[str]:
    timeout = httpx.Timeout(10, read=read_timeout)
    async with http.stream("POST", url, json=body, timeout=timeout) as reply:
        return [line async for line in reply.aiter_lines()]


def test_normalize_model_name() -> None:
    assert normalize_model_name("llama3") == "llama3:latest"
    assert normalize_model_name("llama3.2:1b") == "llama3.2:1b"
    assert normalize_model_name("library/llama3") == "llama3:latest"
    assert normalize_model_name("registry.ollama.ai/library/llama3:8b") == "llama3:8b"
    assert normalize_model_name("hf.co/bartowski/Qwen:Q4_K_M") == "hf.co/bartowski/Qwen:Q4_K_M"
    for bad in ("", " llama3", "llama3:", "a/b/c/d", "-x", "x:!"):
        with pytest.raises(InvalidModelName):
            normalize_model_name(bad)


async def test_root_version_and_server_listing(emu: Emulator, http: httpx.AsyncClient) -> None:
    node = emu.add_ollama("node-1")
    assert node.base_url == f"{emu.url}/ollama/node-1"
    root = await http.get(node.base_url + "/")
    assert (root.status_code, root.text) == (200, "Ollama is running")
    head = await http.head(node.base_url + "/")
    assert (head.status_code, head.content) == (200, b"")
    assert (await http.get(node.base_url + "/api/version")).json() == {"version": "0.5.1"}
    emu.add_vllm("v-1", model="m")
    listing = (await http.get(f"{emu.url}/_emulator/backends")).json()
    assert {(b["kind"], b["name"], b["base_url"]) for b in listing} == {
        ("ollama", "node-1", node.base_url),
        ("vllm", "v-1", f"{emu.url}/vllm/v-1"),
    }
    only = (await http.get(f"{emu.url}/_emulator/backends", params={"kind": "vllm"})).json()
    assert [b["name"] for b in only] == ["v-1"]
    # An Ollama node counts the pull requests it received, per model, for other processes.
    for _ in range(2):
        await http.post(node.base_url + "/api/pull", json={"model": "llama3", "stream": False})
    (ollama,) = (await http.get(f"{emu.url}/_emulator/backends", params={"kind": "ollama"})).json()
    assert ollama["pull_requests"] == {"llama3:latest": 2}
    assert (await http.get(f"{emu.url}/ollama/nobody/api/tags")).status_code == 404
    unknown = await http.get(node.base_url + "/api/nothing")
    assert (unknown.status_code, unknown.text) == (404, "404 page not found")
    emu.remove("node-1")
    assert (await http.get(node.base_url + "/api/tags")).status_code == 404
    with pytest.raises(KeyError):
        emu.remove("node-1")


async def test_tags_shape_and_latest_normalization(emu: Emulator, http: httpx.AsyncClient) -> None:
    node = emu.add_ollama("n", models=["llama3", "llama3.2:1b"])
    assert set(node.models) == {"llama3:latest", "llama3.2:1b"}
    body = (await http.get(node.base_url + "/api/tags")).json()
    entry = body["models"][0]
    assert set(entry) == {"name", "model", "modified_at", "size", "digest", "details"}
    assert entry["name"] == entry["model"] == "llama3:latest"
    assert HEX64.match(entry["digest"])
    assert set(entry["details"]) == {
        "parent_model",
        "format",
        "family",
        "families",
        "parameter_size",
        "quantization_level",
    }
    assert body["models"][1]["details"]["parameter_size"] == "1B"
    other = emu.add_ollama("m", models=["llama3:latest"])
    assert other.models["llama3:latest"].digest == node.models["llama3:latest"].digest


async def test_pull_stream_sequence_adds_the_model(emu: Emulator, http: httpx.AsyncClient) -> None:
    node = emu.add_ollama("n")
    node.pull_seconds = 0.01
    lines = await pull_lines(http, node, "qwen2:0.5b")
    statuses = [line["status"] for line in lines]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    layers = node.models["qwen2:0.5b"].layers
    for layer in layers:
        series = [line for line in lines if line["status"] == f"pulling {layer.digest[:12]}"]
        assert series, layer
        assert all(line["digest"] == f"sha256:{layer.digest}" for line in series)
        assert all(line["total"] == layer.size for line in series)
        assert "completed" not in series[0]
        assert series[-1]["completed"] == layer.size
        completed = [line.get("completed", 0) for line in series]
        assert completed == sorted(completed)
    assert "removing unused layers" not in statuses
    assert (await http.get(node.base_url + "/api/tags")).json()["models"][0]["name"] == "qwen2:0.5b"
    again = await pull_lines(http, node, "qwen2:0.5b")
    per_layer = [
        line for line in again if line["status"].startswith("pulling ") and "digest" in line
    ]
    assert len(per_layer) == len(layers)
    assert all(line["completed"] == line["total"] for line in per_layer)


async def test_pull_replacing_a_model_prunes_its_layers(
    emu: Emulator, http: httpx.AsyncClient
) -> None:
    node = emu.add_ollama("n")
    node.add_model("llama3", size=123_456)
    node.offer("llama3", size=999_999)
    statuses = [line["status"] for line in await pull_lines(http, node, "llama3")]
    assert statuses[-2:] == ["removing unused layers", "success"]
    assert node.models["llama3:latest"].size == 999_999


async def test_pull_errors(emu: Emulator, http: httpx.AsyncClient) -> None:
    node = emu.add_ollama("n", pullable=["llama3"])
    url = node.base_url + "/api/pull"
    missing = await http.post(url, content=b"")
    assert (missing.status_code, missing.json()) == (400, {"error": "missing request body"})
    bad = await http.post(url, json={"model": "bad name!"})
    assert (bad.status_code, bad.json()) == (400, {"error": "invalid model name"})
    lines = await pull_lines(http, node, "mistral")
    assert lines == [
        {"status": "pulling manifest"},
        {"error": "pull model manifest: file does not exist"},
    ]
    assert "mistral:latest" not in node.models
    quiet = await http.post(url, json={"model": "mistral", "stream": False})
    assert quiet.status_code == 500
    assert quiet.json() == {"error": "pull model manifest: file does not exist"}
    node.pullable = {"mistral", "llama3"}
    assert (await pull_lines(http, node, "mistral:latest"))[-1] == {"status": "success"}
    done = await http.post(url, json={"name": "llama3", "stream": False})
    assert (done.status_code, done.json()) == (200, {"status": "success"})
    assert "llama3:latest" in node.models


async def test_pull_spreads_over_pull_seconds_on_the_clock() -> None:
    clock = FakeClock()
    async with Emulator(clock=clock) as emu, httpx.AsyncClient(timeout=10) as http:
        node = emu.add_ollama("n", pull_seconds=100.0)
        task = asyncio.create_task(pull_lines(http, node, "llama3"))
        await eventually(lambda: clock.sleepers, what="the pull waiting on the clock")
        assert "llama3:latest" not in node.models

        def advanced() -> bool:
            clock.advance(10.0)
            return task.done()

        await eventually(advanced, what="the pull finished as the clock moved")
        assert (await task)[-1] == {"status": "success"}
        assert clock.monotonic() >= 100.0


async def test_disconnected_pull_adds_nothing() -> None:
    # The pull runs on a FakeClock: after the client goes away the clock is moved far past
    # the pull's whole length, so a pull that went on without its client would land the model.
    clock = FakeClock()
    async with Emulator(clock=clock) as emu, httpx.AsyncClient(timeout=10) as http:
        node = emu.add_ollama("n", pull_seconds=30.0)
        async with http.stream("POST", node.base_url + "/api/pull", json={"model": "x"}) as reply:
            async for _ in reply.aiter_lines():
                break
        assert node.pulls_running == 1

        def ended() -> bool:
            clock.advance(30.0)
            return node.pulls_running == 0 and node.active == 0

        await eventually(ended, what="the abandoned pull ended")
        assert (node.pulls_broken_off, node.streams_abandoned) == (1, 1)
        assert node.models == {}


async def test_delete(emu: Emulator, http: httpx.AsyncClient) -> None:
    node = emu.add_ollama("n", models=["llama3"])
    url = node.base_url + "/api/delete"
    gone = await http.request("DELETE", url, json={"model": "llama3:13b"})
    assert (gone.status_code, gone.json()) == (404, {"error": "model 'llama3:13b' not found"})
    assert (await http.request("DELETE", url, json={"model": "x y"})).status_code == 400
    assert (await http.request("DELETE", url, content=b"{")).status_code == 400
    ok = await http.request("DELETE", url, json={"model": "llama3"})
    assert (ok.status_code, ok.content) == (200, b"")
    assert node.models == {}


async def test_show(emu: Emulator, http: httpx.AsyncClient) -> None:
    node = emu.add_ollama("n", models=["llama3.2:1b"])
    node.add_model("nomic-embed-text", capabilities=("embedding",), context_length=8192)
    url = node.base_url + "/api/show"
    required = await http.post(url, json={"model": ""})
    assert (required.status_code, required.json()) == (400, {"error": "model is required"})
    assert (await http.post(url, json={"model": "nope"})).status_code == 404
    body = (await http.post(url, json={"model": "nomic-embed-text"})).json()
    assert body["capabilities"] == ["embedding"]
    arch = body["model_info"]["general.architecture"]
    assert body["model_info"][f"{arch}.context_length"] == 8192
    assert {"details", "parameters", "template", "modified_at"} <= set(body)
    chat = (await http.post(url, json={"name": "llama3.2:1b"})).json()
    assert chat["capabilities"] == ["completion"]


async def test_ps_and_openai_listing(emu: Emulator, http: httpx.AsyncClient) -> None:
    node = emu.add_ollama("n", models=["llama3", "me/custom:v1"])
    assert (await http.get(node.base_url + "/api/ps")).json() == {"models": []}
    await http.post(node.base_url + "/api/generate", json={"model": "llama3", "prompt": ""})
    running = (await http.get(node.base_url + "/api/ps")).json()["models"]
    assert [m["name"] for m in running] == ["llama3:latest"]
    assert {"expires_at", "size_vram", "context_length", "digest", "details"} <= set(running[0])
    listing = (await http.get(node.base_url + "/v1/models")).json()
    assert listing["object"] == "list"
    owners = {m["id"]: m["owned_by"] for m in listing["data"]}
    assert owners == {"llama3:latest": "library", "me/custom:v1": "me"}


async def test_chat_and_generate(emu: Emulator, http: httpx.AsyncClient) -> None:
    node = emu.add_ollama("n", models=["llama3", "nomic-embed-text"])
    chat_body = {"model": "llama3", "messages": [{"role": "user", "content": "hello there"}]}
    async with http.stream("POST", node.base_url + "/api/chat", json=chat_body) as reply:
        chunks = [json.loads(line) async for line in reply.aiter_lines() if line]
    assert all(not c["done"] for c in chunks[:-1])
    final = chunks[-1]
    assert final["done"] is True
    assert final["done_reason"] == "stop"
    assert final["eval_count"] == len(chunks) - 1
    for key in ("total_duration", "load_duration", "prompt_eval_count", "eval_duration"):
        assert isinstance(final[key], int)
    text = "".join(c["message"]["content"] for c in chunks)
    whole = await http.post(node.base_url + "/api/chat", json={**chat_body, "stream": False})
    assert whole.json()["message"] == {"role": "assistant", "content": text}
    assert "hello there" in text
    gen = {"model": "llama3", "prompt": "hello there", "stream": False}
    cut = {**gen, "options": {"num_predict": 2}}
    short = (await http.post(node.base_url + "/api/generate", json=cut)).json()
    assert (short["done_reason"], short["eval_count"]) == ("length", 2)
    missing = await http.post(node.base_url + "/api/chat", json={**chat_body, "model": "zz"})
    assert missing.status_code == 404
    assert missing.json() == {"error": 'model "zz" not found, try pulling it first'}
    embed_only = await http.post(
        node.base_url + "/api/generate", json={**gen, "model": "nomic-embed-text"}
    )
    assert embed_only.status_code == 400


async def test_embed(emu: Emulator, http: httpx.AsyncClient) -> None:
    node = emu.add_ollama("n", models=["nomic-embed-text"])
    url = node.base_url + "/api/embed"
    one = (await http.post(url, json={"model": "nomic-embed-text", "input": "a"})).json()
    two = (await http.post(url, json={"model": "nomic-embed-text", "input": ["a", "b"]})).json()
    assert len(one["embeddings"]) == 1
    assert len(two["embeddings"]) == 2
    assert one["embeddings"][0] == two["embeddings"][0] != two["embeddings"][1]
    vector = one["embeddings"][0]
    assert len(vector) == 768
    assert abs(sum(v * v for v in vector) - 1.0) < 1e-6


async def test_request_faults(emu: Emulator, http: httpx.AsyncClient) -> None:
    node = emu.add_ollama("n", models=["llama3"])
    tags = node.base_url + "/api/tags"
    node.faults.fail(status=503, times=2)
    assert (await http.get(tags)).json() == {"error": "boom"}
    assert (await http.get(tags)).status_code == 503
    assert (await http.get(tags)).status_code == 200
    node.faults.fail(status=500, body=b"plain", path="/api/version")
    assert (await http.get(tags)).status_code == 200
    assert (await http.get(node.base_url + "/api/version")).content == b"plain"
    node.faults.clear()
    node.faults.malformed()
    malformed = await http.get(tags)
    assert malformed.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        malformed.json()
    node.faults.clear()
    node.faults.oversized(size=1_000_000)
    big = await http.get(tags)
    assert big.status_code == 200
    assert len(big.content) == 1_000_000
    assert big.content.startswith(b'{"models":[')
    node.faults.clear()
    assert [r.path for r in node.requests][-2:] == ["/api/tags", "/api/tags"]
    assert node.requests[0].method == "GET"


async def test_hang_blocks_only_its_backend(emu: Emulator, http: httpx.AsyncClient) -> None:
    stuck = emu.add_ollama("stuck")
    free = emu.add_ollama("free")
    stuck.faults.hang()
    with pytest.raises(httpx.ReadTimeout):
        await http.get(stuck.base_url + "/api/tags", timeout=httpx.Timeout(10, read=0.3))
    assert (await http.get(free.base_url + "/api/tags")).status_code == 200
    pending = asyncio.create_task(http.get(stuck.base_url + "/api/tags"))
    await asyncio.sleep(0.05)
    assert not pending.done()
    stuck.faults.clear()
    assert (await pending).status_code == 200


async def test_latency_delays_every_answer_on_the_clock_and_all_at_once(
    http: httpx.AsyncClient,
) -> None:
    clock = FakeClock()
    async with Emulator(latency=0.05, clock=clock) as emu:
        nodes = [emu.add_ollama(f"n{i}") for i in range(100)]
        replies = asyncio.gather(*(http.get(n.base_url + "/api/tags") for n in nodes))
        # All hundred are waiting out their latency together: answered concurrently.
        await eventually(lambda: clock.sleepers == 100, what="every request in its latency")
        assert (emu.active, emu.max_active) == (100, 100)
        clock.advance(0.049)
        assert clock.sleepers == 100  # none answered before its latency
        clock.advance(0.001)
        assert all(r.status_code == 200 for r in await replies)
        assert emu.active == 0
        # A backend's own latency overrides the emulator's.
        nodes[0].faults.latency = 0.3
        slow = asyncio.create_task(http.get(nodes[0].base_url + "/api/tags"))
        await eventually(lambda: clock.sleepers == 1, what="the request in its latency")
        clock.advance(0.29)
        assert clock.sleepers == 1
        clock.advance(0.01)
        assert (await slow).status_code == 200


async def test_stream_faults(emu: Emulator, http: httpx.AsyncClient) -> None:
    node = emu.add_ollama("n", pull_seconds=0.0)
    node.faults.break_stream(after_lines=2)
    seen: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        async with http.stream("POST", node.base_url + "/api/pull", json={"model": "a"}) as reply:
            seen.extend([line async for line in reply.aiter_lines() if line])
    assert len(seen) <= 2
    node.faults.clear()
    node.faults.stream_error(after_lines=1, message="boom mid-stream")
    lines = await pull_lines(http, node, "a")
    assert lines == [{"status": "pulling manifest"}, {"error": "boom mid-stream"}]
    node.faults.clear()
    node.faults.stall_stream(after_lines=1)
    with pytest.raises(httpx.ReadTimeout):
        await drain(http, node.base_url + "/api/pull", {"model": "a"}, read_timeout=0.3)
    assert node.models == {}
    node.faults.clear()
    assert (await pull_lines(http, node, "a"))[-1] == {"status": "success"}


async def test_many_backends_are_a_dict_lookup(emu: Emulator, http: httpx.AsyncClient) -> None:
    nodes = [emu.add_ollama(f"node-{i}", models=["llama3"]) for i in range(1000)]
    replies = await asyncio.gather(*(http.get(n.base_url + "/api/tags") for n in nodes[::50]))
    assert all(r.json()["models"][0]["name"] == "llama3:latest" for r in replies)
    assert len(emu.backends) == 1000


def test_emulator_thread() -> None:
    with EmulatorThread(latency=0.0) as runner:
        node = runner.call(lambda emu: emu.add_ollama("n", models=["llama3"]))
        reply = httpx.get(node.base_url + "/api/tags", timeout=10)
        assert reply.json()["models"][0]["name"] == "llama3:latest"
        runner.call(lambda emu: node.faults.fail(status=502))
        assert httpx.get(node.base_url + "/api/tags", timeout=10).status_code == 502


async def test_request_log_is_bounded_and_redacted(http: httpx.AsyncClient) -> None:
    async with Emulator(max_recorded=10) as emu:
        acct = emu.add_gemini("g", api_key="AIzaSecretSecret0000")
        for size in range(30):
            await http.get(
                acct.base_url + "/v1beta/models",
                params={"pageSize": size + 1, "key": "AIzaSecretSecret0000"},
            )
        assert 5 <= len(acct.requests) <= 10
        assert acct.requests[-1].query["pageSize"] == "30"
        assert "AIzaSecretSecret0000" not in repr(acct.requests)
        assert "pageSize=30" in repr(acct.requests[-1])


def test_standalone_process_prints_its_url() -> None:
    command = [sys.executable, "-m", "runtimestate.testing", "--ollama", "3", "--models", "llama3"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()
            listing = httpx.get(f"{url}/_emulator/backends", timeout=10).json()
            assert [b["name"] for b in listing] == ["ollama-0", "ollama-1", "ollama-2"]
            tags = httpx.get(listing[2]["base_url"] + "/api/tags", timeout=10).json()
            assert tags["models"][0]["name"] == "llama3:latest"
        finally:
            process.terminate()
            process.wait(timeout=10)
    assert process.returncode == 0


async def test_control_api(emu: Emulator, http: httpx.AsyncClient) -> None:
    control = f"{emu.url}/_emulator"
    added = await http.post(
        control + "/backends", json={"kind": "ollama", "name": "n", "models": ["llama3"]}
    )
    assert added.status_code == 201
    base = added.json()["base_url"]
    assert (await http.get(base + "/api/tags")).json()["models"][0]["name"] == "llama3:latest"
    gemini = {
        "kind": "gemini",
        "name": "g",
        "api_key": "AIzaControl0123456789",
        "models": ["gemini-a", {"name": "gemini-b", "methods": ["embedContent"]}],
    }
    made = await http.post(control + "/backends", json=gemini)
    assert "AIzaControl0123456789" not in made.text
    account = emu.get("gemini", "g")
    assert isinstance(account, GeminiAccount)
    assert [m.name for m in account.models] == ["models/gemini-a", "models/gemini-b"]
    duplicate = await http.post(control + "/backends", json={"kind": "ollama", "name": "n"})
    assert duplicate.status_code == 409
    for bad in (
        {"kind": "llamacpp", "name": "x"},
        {"kind": "ollama", "name": "y", "nope": 1},
        {"kind": "ollama", "name": "z", "models": [1]},
        {"kind": "ollama", "name": "z", "models": ["bad name!"]},
    ):
        refused = await http.post(control + "/backends", json=bad)
        assert refused.status_code == 400
        assert "error" in refused.json()
    faults = control + "/backends/ollama/n/faults"
    armed = await http.post(faults, json={"fault": "fail", "status": 502, "body": "down"})
    assert armed.status_code == 204
    failed = await http.get(base + "/api/tags")
    assert (failed.status_code, failed.text) == (502, "down")
    assert (await http.post(faults, json={"fault": "explode"})).status_code == 400
    assert (await http.delete(faults)).status_code == 204
    assert (await http.get(base + "/api/tags")).status_code == 200
    assert (await http.post(faults, json={"fault": "latency", "seconds": 0.2})).status_code == 204
    node = emu.get("ollama", "n")
    assert node is not None
    assert node.faults.latency == 0.2
    assert (await http.put(control + "/latency", json={"latency": 0.01})).status_code == 204
    assert emu.latency == 0.01
    assert (await http.put(control + "/latency", json={"latency": -1})).status_code == 400
    assert (await http.delete(control + "/backends/ollama/n")).status_code == 204
    assert (await http.delete(control + "/backends/ollama/n")).status_code == 404
    assert emu.get("ollama", "n") is None


def test_every_emulator_class_is_exported() -> None:
    # The invariants of every module's __all__ are in test_public_api.py; here: a test can
    # reach every emulated backend class from the package.
    found, todo = set(), [testing.EmulatedBackend]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if not (sub.__name__.startswith("_") or inspect.isabstract(sub)):
                found.add(sub.__name__)
    assert {"OllamaNode", "VLLMServer", "OpenAIAccount", "GeminiAccount"} <= found
    assert found <= set(testing.__all__)
