"""runtimestate: keeps a fleet of LLM backends in line with what its operator declared."""

from runtimestate.records import (
    GEMINI_KEY,
    OPENAI_KEY,
    PROVIDER_KEY_PREFIX,
    BackendType,
    ListModelResponse,
    LLMState,
    ModelDetails,
    ProviderConfig,
)

__all__ = [
    "GEMINI_KEY",
    "OPENAI_KEY",
    "PROVIDER_KEY_PREFIX",
    "BackendType",
    "LLMState",
    "ListModelResponse",
    "ModelDetails",
    "ProviderConfig",
]
