"""Driver pieces without a store: name normalization, the pure plan step, and the shared HTTP
client's bounded reads and error translation against the emulator's faults."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from runtimestate.backends import (
    COMPLETION,
    EMBEDDING,
    ActionKind,
    Capabilities,
    Declared,
    DriverOptions,
    HttpClient,
    cloud_key,
    ollama_key,
)
from runtimestate.clock import FakeClock
from runtimestate.errors import (
    BackendError,
    BackendUnreachable,
    BadRequest,
    KeyRejected,
    ProtocolError,
    RateLimited,
    ServerError,
)
from runtimestate.kinds.gemini.api import models_url as gemini_models_url
from runtimestate.kinds.ollama.driver import OllamaDriver, OllamaInventory, parse_show
from runtimestate.kinds.openai_api import ServerListing, parse_models
from runtimestate.kinds.openai_api import models_url as openai_models_url
from runtimestate.kinds.vllm import VllmDriver
from runtimestate.records import (
    Capability,
    ListModelResponse,
    capabilities_of,
    capability_flags,
)
from runtimestate.store import Backend, Model
from runtimestate.testing import Emulator

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def model(name: str, **caps: object) -> Model:
    values: dict[str, object] = {
        "context_length": 0,
        "can_chat": False,
        "can_embed": False,
        "can_prompt": False,
        "can_stream": False,
        **caps,
    }
    return Model(id=name, model=name, created_at=EPOCH, updated_at=EPOCH, **values)  # type: ignore[arg-type]


def backend(url: str = "http://node:11434", type: str = "ollama") -> Backend:
    return Backend(
        id="b1", name="node", base_url=url, type=type, created_at=EPOCH, updated_at=EPOCH
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("llama3", "llama3:latest"),
        ("Llama3:Latest", "llama3"),
        ("registry.ollama.ai/library/llama3:8b", "llama3:8b"),
        ("library/qwen2:0.5b", "QWEN2:0.5b"),
        ("localhost:5000/team/model", "localhost:5000/team/model:latest"),
    ],
)
def test_ollama_names_compare_as_ollama_does(a: str, b: str) -> None:
    assert ollama_key(a) == ollama_key(b)


def test_different_ollama_names_stay_different() -> None:
    assert ollama_key("llama3:8b") != ollama_key("llama3")
    assert ollama_key("team/llama3") != ollama_key("llama3")
    assert ollama_key("localhost:5000/llama3") != ollama_key("llama3")
    assert cloud_key("models/gemini-2.0-flash") == cloud_key("Gemini-2.0-Flash")


def test_base_urls_are_not_doubled() -> None:
    assert openai_models_url("http://h/vllm/x") == "http://h/vllm/x/v1/models"
    assert openai_models_url("http://h/vllm/x/v1/") == "http://h/vllm/x/v1/models"
    assert gemini_models_url("http://h/g") == "http://h/g/v1beta/models"
    assert gemini_models_url("http://h/g/v1beta") == "http://h/g/v1beta/models"


def test_show_capabilities_and_context() -> None:
    caps = parse_show(
        {
            "capabilities": ["completion", "vision"],
            "model_info": {"general.architecture": "gemma3", "gemma3.context_length": 131072},
        }
    )
    assert caps == Capabilities(context_length=131072, flags=COMPLETION)
    assert parse_show({"capabilities": ["embedding"]}) == Capabilities(flags=EMBEDDING)
    with pytest.raises(ProtocolError):
        parse_show(["not", "an", "object"])


def test_declared_capabilities_win_and_gaps_are_discovered() -> None:
    chat_prompt = frozenset({Capability.CHAT, Capability.PROMPT})
    discovered = Capabilities(context_length=8192, flags=chat_prompt)
    assert Capabilities(context_length=4096).merged(discovered) == Capabilities(
        context_length=4096, flags=chat_prompt
    )
    declared = Capabilities(flags=EMBEDDING)
    assert declared.merged(discovered) == Capabilities(context_length=8192, flags=EMBEDDING)
    assert declared.merged(None) == declared
    assert not declared.complete
    assert Capabilities(context_length=1, flags=frozenset({Capability.CHAT})).complete


def test_capabilities_convert_to_and_from_the_json_flags_only_at_the_edges() -> None:
    for flags in itertools.product((False, True), repeat=4):
        fields = dict(
            zip(("can_chat", "can_prompt", "can_embed", "can_stream"), flags, strict=True)
        )
        listed = ListModelResponse(name="m", model="m", **fields)
        assert capability_flags(capabilities_of(listed)) == fields
        assert listed.capabilities == capabilities_of(listed)
    assert capabilities_of(ListModelResponse(name="m", model="m", can_embed=True)) == EMBEDDING


def test_ollama_plan_is_pure_and_complete() -> None:
    driver = OllamaDriver(DriverOptions(clock=FakeClock()))
    declared = Declared(
        backend=backend(),
        models=(model("llama3", context_length=4096, can_chat=True), model("phi3"), model("m2")),
    )
    inventory = OllamaInventory(
        models=(
            ListModelResponse(name="llama3:latest", model="llama3:latest", digest="d1"),
            ListModelResponse(name="junk:1b", model="junk:1b", digest="d2"),
        ),
        discovered={},
    )
    plan = driver.plan(declared, inventory)
    # Every missing model, in declaration order: each becomes its own pull task.
    assert [(a.kind, a.model) for a in plan.actions] == [
        (ActionKind.PULL, "phi3"),
        (ActionKind.PULL, "m2"),
        (ActionKind.DELETE, "junk:1b"),
    ]
    assert [m.name for m in plan.state.pulled_models] == ["llama3:latest"]
    assert plan.state.pulled_models[0].context_length == 4096
    assert driver.plan(declared, inventory) == plan


@pytest.fixture
async def http() -> AsyncIterator[HttpClient]:
    client = HttpClient(timeout=1.0, max_body_bytes=64 * 1024, max_line_bytes=4096)
    yield client
    await client.aclose()


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, KeyRejected),
        (429, RateLimited),
        (404, BadRequest),
        (502, ServerError),
    ],
)
async def test_statuses_become_errors_by_what_to_do(
    emu: Emulator, http: HttpClient, status: int, error: type[BackendError]
) -> None:
    node = emu.add_ollama("n")
    node.faults.fail(status=status, body=b'{"error":"because"}')
    with pytest.raises(error, match=rf"HTTP {status} from .*: {{\"error\":\"because\"}}"):
        await http.request_json("GET", node.base_url + "/api/tags")


async def test_bodies_are_read_with_a_bound(emu: Emulator, http: HttpClient) -> None:
    node = emu.add_ollama("n")
    node.faults.oversized(size=10 * 1024 * 1024)
    with pytest.raises(ProtocolError, match="response too large"):
        await http.request_json("GET", node.base_url + "/api/tags")
    node.faults.clear()
    node.faults.malformed()
    with pytest.raises(ProtocolError, match="malformed JSON"):
        await http.request_json("GET", node.base_url + "/api/tags")


async def test_a_request_times_out_on_its_own(emu: Emulator, http: HttpClient) -> None:
    node = emu.add_ollama("n")
    node.faults.hang()
    with pytest.raises(BackendUnreachable, match="timed out"):
        await http.request_json("GET", node.base_url + "/api/tags")


async def read_pull(http: HttpClient, url: str, into: list[dict[str, object]]) -> None:
    async with http.stream_lines("POST", url + "/api/pull", json_body={"model": "phi3"}) as lines:
        async for line in lines:
            into.append(line)


async def test_stream_lines_are_bounded_and_breaks_are_errors(
    emu: Emulator, http: HttpClient
) -> None:
    node = emu.add_ollama("n")
    node.faults.break_stream(after_lines=2)
    lines: list[dict[str, object]] = []
    with pytest.raises(BackendUnreachable, match="broke"):
        await read_pull(http, node.base_url, lines)
    assert lines[0] == {"status": "pulling manifest"}
    node.faults.clear()
    node.faults.oversized(path="/api/pull", size=64 * 1024)
    with pytest.raises(ProtocolError):
        await read_pull(http, node.base_url, [])


async def test_secrets_in_urls_never_reach_messages(http: HttpClient) -> None:
    with pytest.raises(BackendError) as raised:
        await http.request_json("GET", "http://127.0.0.1:1/v1beta/models?key=AIzaSecret0123456789")
    assert "AIzaSecret0123456789" not in str(raised.value)
    with pytest.raises(BackendUnreachable) as raised:
        await http.request_json("GET", "http://admin:pr0xy-pass@127.0.0.1:1/api/tags")
    assert "pr0xy-pass" not in str(raised.value)
    assert "admin:****@127.0.0.1:1" in str(raised.value)


@pytest.mark.parametrize("url", ["localhost:11434/api/tags", "ftp://node/api/tags"])
async def test_a_url_without_an_http_scheme_is_an_invalid_url(http: HttpClient, url: str) -> None:
    with pytest.raises(BackendError, match=r"invalid URL .*scheme must be http or https"):
        await http.request_json("GET", url)
    with pytest.raises(BackendError, match=r"invalid URL .*scheme must be http or https"):
        async with http.stream_lines("POST", url):
            pass


def test_vllm_lora_adapters_take_their_base_models_context() -> None:
    served = parse_models(
        {
            "object": "list",
            "data": [
                {"id": "base", "max_model_len": 8192, "parent": None},
                {"id": "adapter", "max_model_len": None, "parent": "base"},
            ],
        },
        "http://v/v1/models",
    )
    driver = VllmDriver(DriverOptions(clock=FakeClock()))
    declared = Declared(backend=backend(type="vllm"), models=(model("base"), model("adapter")))
    plan = driver.plan(declared, ServerListing(models=served))
    assert plan.state.error == ""
    assert [(m.name, m.context_length) for m in plan.state.pulled_models] == [
        ("base", 8192),
        ("adapter", 8192),
    ]


async def test_redirects_are_not_followed(emu: Emulator, http: HttpClient) -> None:
    node = emu.add_ollama("n")
    node.faults.fail(status=307, body=b"")
    with pytest.raises(ProtocolError, match=r"unexpected redirect \(HTTP 307\)"):
        await http.request_json("GET", node.base_url + "/api/tags")
