"""Protocol-faithful emulators of Ollama, vLLM, OpenAI and Gemini for tests, benchmarks and demos.

One :class:`Emulator` is a real aiohttp server on loopback serving any number of virtual
backends, each under its own base URL, with its own inventory, fault injection and request log.
Drivers and official clients talk to it over real sockets; nothing is mocked. See
:mod:`runtimestate.testing.server` for the dispatcher and ``python -m runtimestate.testing
--help`` for running it standalone.
"""

from runtimestate.testing.base import EmulatedBackend
from runtimestate.testing.compatible import CompatibleServer
from runtimestate.testing.faults import FaultKind, Faults, RecordedRequest
from runtimestate.testing.gemini import GeminiAccount, GeminiModel
from runtimestate.testing.ollama import OllamaNode
from runtimestate.testing.ollama_models import (
    InvalidModelName,
    OllamaLayer,
    OllamaModel,
    make_model,
    normalize_model_name,
)
from runtimestate.testing.openai import OpenAIAccount, VLLMServer
from runtimestate.testing.server import Emulator
from runtimestate.testing.threaded import EmulatorThread

__all__ = [
    "CompatibleServer",
    "EmulatedBackend",
    "Emulator",
    "EmulatorThread",
    "FaultKind",
    "Faults",
    "GeminiAccount",
    "GeminiModel",
    "InvalidModelName",
    "OllamaLayer",
    "OllamaModel",
    "OllamaNode",
    "OpenAIAccount",
    "RecordedRequest",
    "VLLMServer",
    "make_model",
    "normalize_model_name",
]
