"""Starting KMS workers: spawn, bootstrap (HELLO/READY), watch and restart.  Supervisor side (trio).

``supervisor``  :class:`KMSSupervisor` and :func:`open_kms` (see its theory of operation)

Used by the privileged supervisor process (``server.privsep``), which hands bootstrapped
sockets to the gateway, and by the in-process ``serve()``. It is a room of its own, apart
from ``client``, because it is the only gateway-side code that starts processes and holds
the descriptor of an environment-provided KEK to pass on to them; the request path
(``server.gateway``, ``api``, ``http``) never needs it, and ``.importlinter`` says so. Like
every gateway-side package it never imports ``qpher_proxy.kms.worker``: workers are separate
processes started by module name (:data:`WORKER_MODULE`).
"""

from __future__ import annotations

from .supervisor import (
    WORKER_MODULE,
    HandoffHook,
    KMSSupervisor,
    WorkerHandoff,
    default_worker_count,
    open_kms,
    stash_env_kek,
)

__all__ = [
    "WORKER_MODULE", "HandoffHook", "KMSSupervisor", "WorkerHandoff", "default_worker_count", "open_kms",
    "stash_env_kek",
]
