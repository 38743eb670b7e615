"""``python -m runtimestate.testing``: serve emulated backends from a standalone process.

For benchmarks and demos that want the emulator in another process (its own core, its own GIL)::

    python -m runtimestate.testing --ollama 1000 --models llama3.2:1b --latency 0.05 --port 11500

prints the server root URL as the first line of standard output once it is listening (so a parent
process can read one line and go on), then serves until interrupted. Backends are named
``ollama-0``, ``ollama-1``, … (``vllm-N``, ``openai-N``, ``gemini-N``); ``GET <url>/_emulator/
backends`` lists each with its base URL, and the rest of the control API under ``/_emulator/``
(see :mod:`runtimestate.testing.control`) adds backends and arms faults while it runs. The cloud
keys come from ``--openai-key`` / ``--gemini-key`` and are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from runtimestate.testing.gemini import GeminiModel
from runtimestate.testing.server import Emulator

_DEFAULT_GEMINI = (
    GeminiModel(name="models/gemini-2.0-flash"),
    GeminiModel(
        name="models/text-embedding-004",
        input_token_limit=2048,
        output_token_limit=1,
        methods=("embedContent", "batchEmbedContents"),
    ),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtimestate.testing", description="Serve emulated LLM backends."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--ollama", type=int, default=0, help="number of Ollama nodes")
    parser.add_argument(
        "--models", default="", help="comma-separated models every Ollama node starts with"
    )
    parser.add_argument("--pull-seconds", type=float, default=2.0, help="duration of one pull")
    parser.add_argument("--vllm", type=int, default=0, help="number of vLLM servers")
    parser.add_argument("--vllm-model", default="meta-llama/Llama-3.1-8B-Instruct")
    parser.add_argument("--openai", type=int, default=0, help="number of OpenAI accounts")
    parser.add_argument("--openai-key", default="sk-emulated-0123456789")
    parser.add_argument("--openai-models", default="gpt-4o,gpt-4o-mini,text-embedding-3-small")
    parser.add_argument("--gemini", type=int, default=0, help="number of Gemini accounts")
    parser.add_argument("--gemini-key", default="AIzaEmulated0123456789")
    return parser


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


async def _serve(args: argparse.Namespace) -> None:
    async with Emulator(latency=args.latency, host=args.host, port=args.port) as emu:
        models = _split(args.models)
        for index in range(args.ollama):
            emu.add_ollama(f"ollama-{index}", models=models, pull_seconds=args.pull_seconds)
        for index in range(args.vllm):
            emu.add_vllm(f"vllm-{index}", model=args.vllm_model)
        for index in range(args.openai):
            emu.add_openai(
                f"openai-{index}", api_key=args.openai_key, models=_split(args.openai_models)
            )
        for index in range(args.gemini):
            emu.add_gemini(f"gemini-{index}", api_key=args.gemini_key, models=_DEFAULT_GEMINI)
        sys.stdout.write(emu.url + "\n")
        sys.stdout.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
