"""The ``runtimestate`` command line (see :mod:`.app` for the commands and their conventions).

A package rather than one module because it has three separable concerns: the HTTP client for
the service's API (:mod:`.client`), rendering for people and scripts (:mod:`.render`), and the
commands (:mod:`.app`, :mod:`.serve`).
"""

from runtimestate.cli.app import app, main

__all__ = ["app", "main"]
