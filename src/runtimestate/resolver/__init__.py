"""Provider selection: pick a model client for a request, by name, capability, context, policy.

Build a :class:`Resolver` from the providers of a snapshot (see
:func:`runtimestate.providers.local_provider_adapter`) and a
:class:`~runtimestate.providers.ClientPool`; call ``resolve_chat``, ``resolve_prompt``,
``resolve_embed`` or ``resolve_stream`` with a :class:`ResolveRequest`. Resolution does no I/O.
"""

from runtimestate.resolver.core import Resolution, Resolver, ResolveRequest
from runtimestate.resolver.names import model_family, normalize_model_name
from runtimestate.resolver.policies import POLICIES

__all__ = [
    "POLICIES",
    "Resolution",
    "ResolveRequest",
    "Resolver",
    "model_family",
    "normalize_model_name",
]
