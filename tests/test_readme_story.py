"""The README's library story, end to end over real sockets: declare a model, let the
reconciler pull it onto an emulated Ollama node, and stream a chat answer from the snapshot.

It uses exactly the calls the README shows, so the README cannot drift from the API."""

from __future__ import annotations

from runtimestate import (
    Resolver,
    ResolveRequest,
    State,
    Store,
    local_provider_adapter,
    open_bus,
)
from runtimestate.providers import ClientPool
from runtimestate.testing import Emulator


async def test_declare_reconcile_pull_and_stream_an_answer(store: Store) -> None:
    async with Emulator() as emu:
        node = emu.add_ollama("gpu-1")
        await store.create_backend(name="gpu-1", base_url=node.base_url, type="ollama")
        await store.append_model(
            model="llama3.2:1b", context_length=131072, can_chat=True, can_stream=True
        )

        async with await open_bus() as bus, State(store, bus, backend_timeout=10) as state:
            plans = await state.plan_backend_cycle()
            assert [a.model for plan in plans.values() for a in plan.actions] == ["llama3.2:1b"]
            assert node.models == {}  # a plan is a dry run

            await state.run_backend_cycle()
            pulled = 0
            while await state.run_download_cycle():
                pulled += 1
            assert pulled == 1
            await state.run_backend_cycle()

            (observed,) = state.get().values()
            assert observed.error == ""
            assert [m.name for m in observed.pulled_models] == ["llama3.2:1b"]

            providers = await local_provider_adapter(state.get())()
            async with ClientPool() as pool:
                resolver = Resolver(providers, pool=pool)
                chosen = resolver.resolve_stream(
                    ResolveRequest(models=("llama3.2",), min_context=8192, policy="least-in-flight")
                )
                chunks = [
                    chunk
                    async for chunk in chosen.client.stream(
                        [{"role": "user", "content": "Why is the sky blue?"}]
                    )
                ]
    assert chosen.backend_id == observed.id
    assert len(chunks) > 1
    assert "Why is the sky blue?" in "".join(chunks)
