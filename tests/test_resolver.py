"""The resolver and the adapter without network: name matching, every policy, cooldowns, errors.

Snapshots are built directly from ``LLMState`` records (no reconciler), providers come from the
real adapter, and time is a :class:`FakeClock`, so the cooldown cycle runs in microseconds.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from datetime import timedelta

import pytest

from runtimestate.clock import FakeClock
from runtimestate.errors import AllCoolingDown, InvalidInput, NoProvider
from runtimestate.providers import (
    Capability,
    ClientPool,
    HealthConfig,
    Provider,
    build_providers,
    local_provider_adapter,
)
from runtimestate.records import BackendInfo, ListModelResponse, LLMState
from runtimestate.resolver import (
    POLICIES,
    Resolver,
    ResolveRequest,
    model_family,
    normalize_model_name,
)

ALL = {"can_chat": True, "can_prompt": True, "can_stream": True}


def model(name: str, *, ctx: int = 8192, embed: bool = False, **caps: bool) -> ListModelResponse:
    flags = {"can_embed": True} if embed else dict(ALL)
    flags.update(caps)
    return ListModelResponse(name=name, model=name, context_length=ctx, **flags)


def state(
    backend_id: str,
    kind: str,
    *models: ListModelResponse,
    error: str = "",
    drift: tuple[str, ...] = (),
    key: str | None = None,
) -> LLMState:
    info = BackendInfo(
        id=backend_id, name=f"name-{backend_id}", base_url=f"http://h/{backend_id}", type=kind
    )
    llm = LLMState(
        id=backend_id,
        name=info.name,
        backend=info,
        pulled_models=models,
        error=error,
        undeclared_models=drift,
    )
    return llm.with_api_key(key)


def fleet() -> dict[str, LLMState]:
    return {
        "o1": state("o1", "ollama", model("llama3.1:8b"), model("nomic-embed-text", embed=True)),
        "o2": state("o2", "ollama", model("llama3.1:8b"), model("qwen2.5:7b", ctx=32768)),
        "o3": state("o3", "ollama", model("llama3.1:8b")),
        "v1": state("v1", "vllm", model("meta-llama/Llama-3.1-70B-Instruct", ctx=131072)),
        "g1": state(
            "g1",
            "gemini",
            model("models/gemini-2.0-flash", ctx=1048576),
            drift=("models/unused",),
            key="AIzaSecretKey0123456789",
        ),
        "bad": state("bad", "ollama", model("llama3.1:8b"), error="connection refused"),
    }


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pool(clock: FakeClock) -> ClientPool:
    return ClientPool(clock=clock, health_config=HealthConfig(failure_threshold=2))


@pytest.fixture
def resolver(pool: ClientPool) -> Resolver:
    return Resolver(build_providers(fleet()), pool=pool, rng=random.Random(7))


def test_normalization_ignores_case_separators_org_quantization_and_latest() -> None:
    same = [
        "llama3.1:8b-instruct-q4_K_M",
        "meta-llama/Llama-3.1-8B-Instruct",
        "LLAMA_3.1_8b_instruct:Q8_0",
        "llama-3.1-8b-instruct-awq",
    ]
    assert {normalize_model_name(n) for n in same} == {"llama318binstruct"}
    assert normalize_model_name("llama3") == normalize_model_name("llama3:latest")
    assert normalize_model_name("llama3:70b") != normalize_model_name("llama3:8b")
    assert model_family("llama3.1:8b") == model_family("Llama3.1:70b") == "llama31"
    assert normalize_model_name("models/gemini-2.0-flash") == "gemini20flash"


async def test_adapter_groups_backends_skips_failures_and_keeps_drifting_cloud() -> None:
    providers = await local_provider_adapter(fleet())()
    by_id = {p.id: p for p in providers}
    llama = by_id["ollama:llama3.1:8b"]
    assert [b.id for b in llama.backends] == ["o1", "o2", "o3"]  # "bad" has an error
    assert "gemini:models/gemini-2.0-flash" in by_id  # drift does not disable it
    assert by_id["ollama:nomic-embed-text"].capabilities == {Capability.EMBED}
    only_vllm = await local_provider_adapter(fleet())("vllm")
    assert [p.model for p in only_vllm] == ["meta-llama/Llama-3.1-70B-Instruct"]
    with pytest.raises(InvalidInput, match="llamacpp"):
        await local_provider_adapter(fleet())("llamacpp")


async def test_adapter_drops_capability_less_models_and_merges_conservatively() -> None:
    snapshot = {
        "a": state(
            "a",
            "ollama",
            model("x:1b", ctx=4096),
            model("dead", can_chat=False, can_prompt=False, can_stream=False),
        ),
        "b": state("b", "ollama", model("x:1b", ctx=2048, can_stream=False)),
    }
    (only,) = await local_provider_adapter(snapshot)()
    assert only.model == "x:1b"
    assert only.context_length == 2048
    assert only.capabilities == {Capability.CHAT, Capability.PROMPT}


async def test_the_key_stays_out_of_reprs_and_messages(resolver: Resolver) -> None:
    secret = "AIzaSecretKey0123456789"
    providers = await local_provider_adapter(fleet())("gemini")
    assert providers[0].backends[0].api_key == secret
    chosen = resolver.resolve_chat(ResolveRequest(types=("gemini",)))
    for text in (repr(providers), str(providers), repr(chosen), repr(chosen.client)):
        assert secret not in text
    with pytest.raises(NoProvider) as info:
        resolver.resolve_embed(ResolveRequest(types=("gemini",)))
    assert secret not in str(info.value)


def test_preferred_names_resolve_exact_then_normalized_then_family(resolver: Resolver) -> None:
    exact = resolver.resolve_chat(ResolveRequest(models=("qwen2.5:7b",)))
    assert exact.provider.model == "qwen2.5:7b"
    normalized = resolver.resolve_chat(ResolveRequest(models=("Llama-3.1-70B-Instruct",)))
    assert normalized.backend_id == "v1"
    family = resolver.resolve_chat(ResolveRequest(models=("llama3.1",), policy="round-robin"))
    assert family.provider.model == "llama3.1:8b"
    prefix = resolver.resolve_chat(ResolveRequest(models=("llama-3.1-70b",)))
    assert prefix.backend_id == "v1"
    # Priority order: the first name that has a provider wins.
    client, provider, backend_id = resolver.resolve_chat(
        ResolveRequest(models=("no-such-model", "gemini-2.0-flash", "qwen2.5"))
    )
    assert (provider.type, backend_id) == ("gemini", "g1")
    assert client.provider is provider
    with pytest.raises(NoProvider):
        resolver.resolve_chat(ResolveRequest(models=("llama3.1",), exact=True))
    # A name that normalizes to nothing matches nothing, rather than every model by prefix.
    for empty in (":latest", "/", "-"):
        with pytest.raises(NoProvider):
            resolver.resolve_chat(ResolveRequest(models=(empty,)))


def test_filters_by_type_capability_and_context(resolver: Resolver) -> None:
    wide = resolver.resolve_chat(ResolveRequest(min_context=100_000, types=("vllm",)))
    assert wide.backend_id == "v1"
    embed = resolver.resolve_embed(ResolveRequest())
    assert embed.provider.model == "nomic-embed-text"
    big = resolver.resolve_chat(ResolveRequest(models=("llama3.1",), min_context=100_000))
    assert big.provider.type == "vllm"  # the family tier has no 100k llama; the prefix one does
    with pytest.raises(NoProvider) as info:
        resolver.resolve_chat(
            ResolveRequest(models=("qwen2.5",), min_context=65536, types=("ollama",))
        )
    message = str(info.value)
    assert "chat with ollama, models [qwen2.5], context >= 65536" in message
    assert "ollama:qwen2.5:7b (context 32768, chat,prompt,stream, 1 backends)" in message
    assert "ollama:nomic-embed-text (context 8192, embed, 1 backends)" in message
    assert "vllm" not in message.split("Available:")[1]


def test_resolution_does_no_io(resolver: Resolver, pool: ClientPool) -> None:
    for capability in (Capability.CHAT, Capability.PROMPT, Capability.STREAM):
        resolver.resolve(ResolveRequest(), capability)
    assert pool.size == 0  # SDK clients are built on the first request, not on resolution


def test_unknown_policy_or_type_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="fastest") as info:
        ResolveRequest(policy="fastest")
    assert info.value.field == "policy"
    with pytest.raises(InvalidInput, match="llamacpp"):
        ResolveRequest(types=("llamacpp",))
    assert set(POLICIES) == {
        "random",
        "highest-context",
        "round-robin",
        "least-in-flight",
        "lowest-latency",
    }


def test_random_spreads_over_every_backend(resolver: Resolver) -> None:
    request = ResolveRequest(models=("llama3.1:8b",), policy="random")
    seen = Counter(resolver.resolve_chat(request).backend_id for _ in range(300))
    assert set(seen) == {"o1", "o2", "o3"}
    assert min(seen.values()) > 50


def test_highest_context_takes_the_largest_window(resolver: Resolver) -> None:
    chosen = resolver.resolve_chat(ResolveRequest(policy="highest-context"))
    assert chosen.provider.model == "models/gemini-2.0-flash"
    ollama = resolver.resolve_chat(ResolveRequest(policy="highest-context", types=("ollama",)))
    assert ollama.provider.model == "qwen2.5:7b"


def test_round_robin_cycles_in_order(resolver: Resolver) -> None:
    request = ResolveRequest(models=("llama3.1:8b",), policy="round-robin")
    order = [resolver.resolve_chat(request).backend_id for _ in range(6)]
    assert order == ["o1", "o2", "o3", "o1", "o2", "o3"]


async def test_least_in_flight_avoids_busy_backends(resolver: Resolver, pool: ClientPool) -> None:
    request = ResolveRequest(models=("llama3.1:8b",), policy="least-in-flight")
    async with pool.health.track("o1"), pool.health.track("o1"), pool.health.track("o2"):
        assert pool.health.in_flight("o1") == 2
        picks = {resolver.resolve_chat(request).backend_id for _ in range(5)}
        assert picks == {"o3"}
    assert pool.health.in_flight("o1") == 0
    # With nobody busy, ties rotate instead of piling onto the first backend.
    assert {resolver.resolve_chat(request).backend_id for _ in range(3)} == {"o1", "o2", "o3"}


def test_lowest_latency_prefers_the_fastest_average(resolver: Resolver, pool: ClientPool) -> None:
    for backend_id, seconds in (("o1", 0.50), ("o2", 0.05), ("o3", 0.20)):
        pool.health.record_success(backend_id, seconds)
    request = ResolveRequest(models=("llama3.1:8b",), policy="lowest-latency")
    assert {resolver.resolve_chat(request).backend_id for _ in range(5)} == {"o2"}
    for _ in range(10):
        pool.health.record_success("o2", 1.0)  # o2 slows down; the moving average follows
    assert resolver.resolve_chat(request).backend_id == "o3"


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_cooldown_cycle(
    policy: str, resolver: Resolver, pool: ClientPool, clock: FakeClock
) -> None:
    health = pool.health
    request = ResolveRequest(models=("llama3.1:8b",), policy=policy)
    health.record_failure("o1", "boom")
    assert health.cooling_until("o1", clock.monotonic()) is None  # threshold is 2
    health.record_failure("o1", "boom")
    assert {resolver.resolve_chat(request).backend_id for _ in range(20)} <= {"o2", "o3"}
    clock.advance(10)
    for backend_id in ("o2", "o3"):
        health.record_failure(backend_id, "boom")
        health.record_failure(backend_id, "boom")
    # Only the llama backends cool; the preferred-name list falls through to the next name.
    fallback = ResolveRequest(models=("llama3.1:8b", "qwen2.5"), policy=policy)
    with pytest.raises(AllCoolingDown) as info:
        resolver.resolve_chat(fallback)
    assert info.value.retry_at == clock.now() + timedelta(seconds=20)
    assert "cooling down (name-o1, name-o2, name-o3)" in str(info.value)
    view = health.snapshot()
    json.dumps(view)
    assert view["o1"]["coolingUntil"] == (clock.now() + timedelta(seconds=20)).isoformat()
    assert view["o1"]["lastError"] == "boom"
    clock.advance(20)
    assert resolver.resolve_chat(request).backend_id == "o1"
    assert health.snapshot()["o1"]["coolingUntil"] is None


def test_a_success_resets_the_failure_count(pool: ClientPool, clock: FakeClock) -> None:
    health = pool.health
    health.record_failure("o1", "boom")
    health.record_success("o1", 0.1)
    health.record_failure("o1", "boom")
    assert health.cooling_until("o1", clock.monotonic()) is None
    assert health.snapshot()["o1"]["consecutiveFailures"] == 1


def test_wide_requests_over_many_providers_use_every_policy(pool: ClientPool) -> None:
    snapshot = {
        f"b{i}": state(
            f"b{i}", "ollama", *(model(f"m{i}-{j}", ctx=1024 * (j + 1)) for j in range(4))
        )
        for i in range(50)
    }
    providers: list[Provider] = build_providers(snapshot)
    resolver = Resolver(providers, pool=pool, rng=random.Random(1))
    for name in POLICIES:
        chosen = resolver.resolve_chat(ResolveRequest(policy=name, min_context=4096))
        assert chosen.provider.context_length == 4096
    rr = ResolveRequest(policy="round-robin")
    assert len({resolver.resolve_chat(rr).provider.model for _ in range(200)}) == 200
    for i in range(50):
        pool.health.record_failure(f"b{i}", "x")
        pool.health.record_failure(f"b{i}", "x")
    with pytest.raises(AllCoolingDown) as info:
        resolver.resolve_chat(ResolveRequest(policy="random"))
    # 50 cooling backends: the message names 20 and counts the rest.
    assert "cooling down (name-b0, name-b1, name-b10, " in str(info.value)
    assert ", ... and 30 more); the first returns at" in str(info.value)
    assert "name-b9" not in str(info.value)


def test_a_request_takes_one_name_or_any_sequence_and_rejects_the_rest(
    resolver: Resolver,
) -> None:
    # A bare string is one name, not a list of characters; a list is stored as a tuple, so the
    # request stays hashable (round-robin keeps its turns per request).
    one = ResolveRequest(models="qwen2.5:7b", types="ollama")  # type: ignore[arg-type]
    assert (one.models, one.types) == (("qwen2.5:7b",), ("ollama",))
    assert resolver.resolve_chat(one).provider.model == "qwen2.5:7b"
    listed = ResolveRequest(models=["llama3.1:8b"], policy="round-robin")  # type: ignore[arg-type]
    assert listed.models == ("llama3.1:8b",)
    order = [resolver.resolve_chat(listed).backend_id for _ in range(3)]
    assert order == ["o1", "o2", "o3"]
    bad: list[tuple[dict[str, object], str]] = [
        ({"models": [3]}, "models"),
        ({"models": [""]}, "models"),
        ({"types": 7}, "types"),
        ({"models": {"llama3.1": 1}}, "models"),
        ({"min_context": "8k"}, "min_context"),
        ({"min_context": True}, "min_context"),
    ]
    for kwargs, field in bad:
        with pytest.raises(InvalidInput) as info:
            ResolveRequest(**kwargs)  # type: ignore[arg-type]
        assert info.value.field == field


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_several_types_are_one_candidate_set_not_a_priority_order(
    policy: str, resolver: Resolver
) -> None:
    both = ("ollama", "vllm")
    request = ResolveRequest(types=both, policy=policy, min_context=16_384)
    # qwen2.5 (ollama, 32k) and the 70B (vllm, 128k) qualify; neither type may hide the other.
    seen = {resolver.resolve_chat(request).provider.model for _ in range(60)}
    if policy == "highest-context":
        assert seen == {"meta-llama/Llama-3.1-70B-Instruct"}
    else:
        assert seen == {"qwen2.5:7b", "meta-llama/Llama-3.1-70B-Instruct"}
    # The merged group is the same whatever the order the types are given in.
    reverse = ResolveRequest(types=both[::-1], policy="highest-context", min_context=16_384)
    assert resolver.resolve_chat(reverse).backend_id == "v1"


def test_failures_of_calls_in_flight_do_not_extend_a_cooldown(
    pool: ClientPool, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    health = pool.health  # threshold 2, cooldown 30 s
    caplog.set_level(logging.WARNING, logger="runtimestate")
    health.record_failure("o1", "boom")
    health.record_failure("o1", "boom")
    until = health.cooling_until("o1", clock.monotonic())
    assert until is not None
    clock.advance(10)
    for n in range(20):  # requests that were already in flight come back failed
        health.record_failure("o1", f"late {n}")
    assert health.cooling_until("o1", clock.monotonic()) == until
    assert caplog.text.count("cooling down") == 1
    assert health.snapshot()["o1"]["lastError"] == "late 19"
    clock.advance(20)
    assert health.cooling_until("o1", clock.monotonic()) is None
    health.record_failure("o1", "again")  # back from cooldown: a fresh count
    assert health.cooling_until("o1", clock.monotonic()) is None
