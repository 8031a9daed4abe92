"""Loaded key objects, shared by both key stores (SQLite + key files, PostgreSQL).  KMS only.

* :class:`KeyCaches` (a store's half): the per-worker LRU caches of loaded private and public
  key objects, ``cache_size`` entries each, keyed by (tenant, key id, version).
* :class:`KeyObjects` (a tenant repository's half): ``private_key`` / ``public_key`` for the
  crypto operations -- resolve the version (the repository's own ``_resolve``: state checks,
  its freshness rules), then the cache, else load (``_load_private`` / ``_stored_public``).
* :func:`open_sealed`: a sealed version's bytes -> the backend's private key object, checked
  against the key's public key, whichever store kept the bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Protocol

from ...crypto.algorithms import Algorithm
from ...crypto.interface import PrivateKey, PublicKey
from ...errors import KeyCorrupt, QpherError
from . import keyfile
from .key_rules import check_tenant
from .keyfile import KeyBinding

CacheKey = tuple[str, str, int]


class Resolved(Protocol):
    @property
    def key_id(self) -> str: ...
    @property
    def algorithm(self) -> Algorithm: ...
    @property
    def version(self) -> int: ...


class KeyCaches:
    """The store's LRU caches of loaded key objects (see the module docstring)."""

    cache_size: int
    _private: OrderedDict[CacheKey, PrivateKey]
    _public: OrderedDict[CacheKey, PublicKey]

    def _cache_get(self, cache: OrderedDict[CacheKey, Any], k: CacheKey) -> Any:
        obj = cache.get(k)
        if obj is not None:
            cache.move_to_end(k)
        return obj

    def _cache_put(self, cache: OrderedDict[CacheKey, Any], k: CacheKey, obj: Any) -> None:
        cache[k] = obj
        cache.move_to_end(k)
        while len(cache) > self.cache_size:
            cache.popitem(last=False)


class KeyObjects:
    """``private_key`` / ``public_key`` of a tenant repository (see the module docstring)."""

    __slots__ = ("_store", "_tenant")
    _store: Any
    _tenant: str

    def __init__(self, store: Any, tenant_id: str) -> None:
        self._store = store
        self._tenant = check_tenant(tenant_id)

    @property
    def tenant_id(self) -> str:
        return self._tenant

    def _resolve(self, key_id: object, version: object) -> Resolved:
        raise NotImplementedError

    def _load_private(self, r: Any) -> PrivateKey:
        raise NotImplementedError

    def _stored_public(self, r: Any) -> bytes:
        raise NotImplementedError

    def private_key(self, key_id: object, version: object = None) -> tuple[PrivateKey, int]:
        """The loaded private key of an enabled key (latest version unless given)."""
        r = self._resolve(key_id, version)
        store = self._store
        ck = (self._tenant, r.key_id, r.version)
        priv: PrivateKey | None = store._cache_get(store._private, ck)
        if priv is None:
            priv = self._load_private(r)
            store._cache_put(store._private, ck, priv)
        return priv, r.version

    def public_key(self, key_id: object, version: object = None) -> tuple[PublicKey, int]:
        """The public key of an enabled key (latest version unless given)."""
        r = self._resolve(key_id, version)
        store = self._store
        ck = (self._tenant, r.key_id, r.version)
        pub: PublicKey | None = store._cache_get(store._public, ck)
        if pub is None:
            priv = store._cache_get(store._private, ck)
            if priv is not None:
                pub = priv.public_key()
            else:
                pub = store.backend.load_public(r.algorithm, self._stored_public(r))
            store._cache_put(store._public, ck, pub)
        return pub, r.version


def open_sealed(
    store: Any, binding: KeyBinding, algorithm: Algorithm, sealed: bytes, public: bytes | None, noun: str
) -> PrivateKey:
    """Unseal ``sealed`` under the store's KEK and load it; ``KeyCorrupt`` (naming the ``noun``,
    "key file" or "sealed version") unless it is a valid key whose public key is ``public``."""
    what = binding.describe()
    seed = keyfile.unseal(store.kek, binding, sealed)
    try:
        priv: PrivateKey = store.backend.load_private(algorithm, seed)
    except QpherError as exc:
        raise KeyCorrupt(f"{what}: the {noun} holds no valid {algorithm.name} key") from exc
    del seed
    if public is None or priv.public_key().public_bytes() != public:
        raise KeyCorrupt(f"{what}: the {noun} does not match the key's public key")
    return priv


__all__ = ["KeyCaches", "KeyObjects", "Resolved", "open_sealed"]
