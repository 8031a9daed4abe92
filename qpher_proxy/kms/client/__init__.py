"""The gateway's side of the KMS: async calls over the worker socketpairs.  Gateway side (trio).

``pool``  :class:`KMSClient` over one :class:`WorkerChannel` per live worker (see its theory
          of operation)

The gateway process talks to workers through this package alone; it never imports
``qpher_proxy.kms.worker`` (``.importlinter``).
"""

from __future__ import annotations

from .pool import DEFAULT_SPIN, KMS_ERRORS, KMSClient, OpHook, WorkerChannel, error_from_frame

__all__ = ["DEFAULT_SPIN", "KMS_ERRORS", "KMSClient", "OpHook", "WorkerChannel", "error_from_frame"]
