"""The ``liboqs`` backend: ML-KEM and ML-DSA on liboqs (through liboqs-python), the
classical halves of the hybrids and the HPKE AEAD on ``cryptography``.

Theory of operation
-------------------
*Loading.* ``oqs`` is imported only after :mod:`._probe` has loaded the liboqs shared
library with ``ctypes`` from the very places liboqs-python searches; without that,
``import oqs`` would start a ``git clone`` and end in ``SystemExit``. The import is
also silenced: liboqs-python attaches a stdout handler to its logger at import time
(which would corrupt ``--json`` output), and a liboqs/liboqs-python minor-version
mismatch warning is recorded in :meth:`LiboqsBackend.versions` instead of being
raised.

*Seeds.* Keys are stored in the standard seed forms (``Algorithm.private_key_format``);
what liboqs keeps in memory is its own expanded secret key, derived from the seed at
load time and never written anywhere:

- ML-KEM: liboqs-python 0.16.0.1 exposes ``KeyEncapsulation.generate_keypair_seed``
  (``OQS_KEM_keypair_derand``), which takes the FIPS 203 64-byte seed d||z. Used as is.
- ML-DSA: liboqs 0.16.0 has **no** seed-based key generation in its API (no
  ``OQS_SIG_keypair_derand``; mldsa-native's ``*_keypair_internal`` symbols are
  exported but are not API and change names per build). FIPS 204 ``ML-DSA.KeyGen``
  is ``xi <- random(32); KeyGen_internal(xi)``, and liboqs implements it that way: it
  draws exactly 32 bytes from ``OQS_randombytes``. We therefore run liboqs' ordinary
  ``OQS_SIG_keypair`` with ``OQS_randombytes`` temporarily replaced (public API
  ``OQS_randombytes_custom_algorithm``) by a source that returns xi and nothing else.
  Three guards keep that honest: (1) the source must be asked for exactly 32 bytes,
  once, or the key is refused; (2) at start-up a fixed seed is derived this way and
  its public key compared with ``cryptography``'s ``from_seed_bytes`` — on mismatch
  the ML-DSA algorithms are reported unsupported on this backend; (3) the default
  randomness (OpenSSL, or the system RNG) is restored before the lock is released.
  Because the replacement is process-wide, every liboqs call that consumes randomness
  (key generation, encapsulation, hedged signing) runs under one lock, so no other
  thread can draw from the injected seed.

*Checks liboqs leaves to us.* liboqs-python pads or truncates buffers to the expected
size, so every length is checked before the call. The FIPS 203 §7.2 modulus check on
ML-KEM public keys is done here (:func:`mlkem_encapsulation_key_ok`) when the key is
loaded. A tampered ML-KEM ciphertext of the right length decapsulates to the
implicit-rejection secret (liboqs does that), never an error.

*Cost.* liboqs objects are created once: one ``KeyEncapsulation``/``Signature`` per
private key (holding liboqs' expanded secret, freed and cleansed with
``OQS_MEM_cleanse`` when the key object is collected) and one shared context per
algorithm for the public-key operations. Signing, encapsulation and decapsulation then call
liboqs' C functions directly through fixed prototypes (:class:`_Native`) on those objects' struct
and secret-key buffer, with no per-call argument buffers; the other calls go through
liboqs-python's methods.

Test-only hooks (leading underscore): derandomised ML-KEM encapsulation through the
public ``OQS_KEM_encaps_derand``, and ML-DSA signing with a chosen ``rnd`` through the
same randomness injection, so the ACVP/X-Wing/HPKE vectors run byte for byte here.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

import cryptography
from cryptography.hazmat.primitives.asymmetric import mldsa as _crypto_mldsa

from ....crypto._primitives import as_bytes, check_context, mlkem_encapsulation_key_ok
from ....crypto.algorithms import (
    MAX_CONTEXT_BYTES,
    ML_DSA_44,
    ML_DSA_65,
    ML_DSA_65_ECDSA_P256,
    ML_DSA_87,
    ML_KEM_768,
    ML_KEM_1024,
    X_WING,
    Algorithm,
)
from ....errors import BackendUnavailable, CryptoError, InvalidKey
from . import _hybrid
from ._base import (
    BasePrivateKey,
    BasePublicKey,
    KEMPrivateKey,
    KEMPublicKey,
    SignaturePrivateKey,
    SignaturePublicKey,
    check_private_length,
    check_public_length,
    coerce_ciphertext,
    resolve_algorithm,
)
from ._probe import LiboqsProbe, probe_liboqs
from .openssl import openssl_version_text

_OQS_NAMES = {
    ML_KEM_768.name: "ML-KEM-768",
    ML_KEM_1024.name: "ML-KEM-1024",
    ML_DSA_44.name: "ML-DSA-44",
    ML_DSA_65.name: "ML-DSA-65",
    ML_DSA_87.name: "ML-DSA-87",
}
_MLKEM_K = {ML_KEM_768.name: 3, ML_KEM_1024.name: 4}
# What the backend does per algorithm: generate, load a private key, load a public key.
_Ops = tuple[
    Callable[[], BasePrivateKey], Callable[[object], BasePrivateKey], Callable[[object], BasePublicKey]
]

_CRYPTO_MLDSA: dict[
    str,
    type[_crypto_mldsa.MLDSA44PrivateKey | _crypto_mldsa.MLDSA65PrivateKey | _crypto_mldsa.MLDSA87PrivateKey],
] = {
    ML_DSA_44.name: _crypto_mldsa.MLDSA44PrivateKey,
    ML_DSA_65.name: _crypto_mldsa.MLDSA65PrivateKey,
    ML_DSA_87.name: _crypto_mldsa.MLDSA87PrivateKey,
}
_SELF_TEST_SEED = bytes(range(32))
_RANDOMBYTES_FN = ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.c_uint8), ctypes.c_size_t)


def import_oqs(probe: LiboqsProbe) -> tuple[ModuleType, list[str]]:
    """Import liboqs-python once the probe found the library; returns (module, warnings)."""
    if not probe.present:
        raise BackendUnavailable(probe.reason)
    if "oqs" in sys.modules:
        return sys.modules["oqs"], []
    oqs_logger = logging.getLogger("oqs.oqs")
    handlers_before = list(oqs_logger.handlers)
    was_disabled = oqs_logger.disabled
    oqs_logger.disabled = True
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import oqs  # noqa: PLC0415 - deliberately late, after the probe
    except (Exception, SystemExit) as exc:  # SystemExit: liboqs-python's own give-up path
        raise BackendUnavailable(f"liboqs-python could not load liboqs ({type(exc).__name__})") from None
    finally:
        for handler in list(oqs_logger.handlers):
            if handler not in handlers_before:
                oqs_logger.removeHandler(handler)
        oqs_logger.disabled = was_disabled
    return oqs, [str(w.message) for w in caught]


_c = ctypes
_SIGN_FN = _c.CFUNCTYPE(_c.c_int, _c.c_void_p, _c.c_void_p, _c.c_void_p, _c.c_char_p, _c.c_size_t,
                        _c.c_char_p, _c.c_size_t, _c.c_void_p)
_DECAPS_FN = _c.CFUNCTYPE(_c.c_int, _c.c_void_p, _c.c_void_p, _c.c_char_p, _c.c_void_p)
_ENCAPS_FN = _c.CFUNCTYPE(_c.c_int, _c.c_void_p, _c.c_void_p, _c.c_void_p, _c.c_char_p)


class _Native:
    """liboqs' signing, decapsulation and encapsulation called directly, with fixed prototypes.

    liboqs-python's methods build ctypes buffers for every argument (a copy of the message and
    of the ciphertext), read the algorithm's sizes through a fresh struct view and look the
    function up each time: a few microseconds per call, as much as an ML-KEM operation's tenth.
    These take the addresses of liboqs-python's own objects (its ``OQS_SIG``/``OQS_KEM`` struct
    and secret-key buffer, which stay owned and freed by it), pass ``bytes`` arguments without a
    copy (``c_char_p`` points into the bytes object) and copy each result out once."""

    def __init__(self, native: Any) -> None:
        self.sign = _SIGN_FN(("OQS_SIG_sign_with_ctx_str", native))
        self.decaps = _DECAPS_FN(("OQS_KEM_decaps", native))
        self.encaps = _ENCAPS_FN(("OQS_KEM_encaps", native))


def _address(obj: Any) -> int:
    """The address a ctypes pointer holds (liboqs-python's ``_sig``/``_kem``)."""
    addr = ctypes.cast(obj, ctypes.c_void_p).value
    if not addr:
        raise CryptoError("liboqs returned no algorithm object")
    return addr


class _RandomnessInjector:
    """Makes liboqs' ``OQS_randombytes`` return chosen bytes for the duration of one call.

    ``lock`` must be held by every liboqs call that consumes randomness.
    """

    def __init__(self, native: Any) -> None:
        self._native = native
        self.lock = threading.Lock()
        self._data = b""
        self._pos = 0
        self._overrun = False
        self._callback = _RANDOMBYTES_FN(self._feed)  # kept alive as long as the backend
        # liboqs' default source is OpenSSL's RAND_bytes when built with OpenSSL, else
        # the system RNG; there is no getter, so pick the first that switching accepts.
        self._default = b"system"
        for name in (b"OpenSSL", b"system"):
            if native.OQS_randombytes_switch_algorithm(ctypes.c_char_p(name)) == 0:
                self._default = name
                break
        self._default_arg = ctypes.c_char_p(self._default)

    @property
    def default_source(self) -> str:
        return self._default.decode()

    def _feed(self, buf: Any, n: int) -> None:
        pos = self._pos
        if not self._overrun and pos + n <= len(self._data):
            ctypes.memmove(buf, self._data[pos:pos + n], n)
            self._pos = pos + n
        else:
            # Never hand out seed bytes twice: anything beyond the injected data is fresh
            # randomness, and the call is refused afterwards.
            self._overrun = True
            ctypes.memmove(buf, os.urandom(n), n)

    def run(self, data: bytes, fn: Callable[[], Any]) -> Any:
        with self.lock:
            self._data, self._pos, self._overrun = data, 0, False
            self._native.OQS_randombytes_custom_algorithm(self._callback)
            try:
                result = fn()
            finally:
                self._native.OQS_randombytes_switch_algorithm(self._default_arg)
                exact = not self._overrun and self._pos == len(data)
                self._data = b""
        if not exact:
            raise CryptoError("liboqs did not consume the injected randomness as expected (32 bytes, once)")
        return result


# ---- ML-KEM ------------------------------------------------------------------------

class LiboqsMLKEMPublicKey(KEMPublicKey):
    __slots__ = ("algorithm", "_raw", "_ctx", "_lock", "_native", "_encaps", "_kem_addr", "_ct", "_ss")

    def __init__(self, backend: LiboqsBackend, algorithm: Algorithm, raw: bytes) -> None:
        self.algorithm = algorithm
        self._raw = raw
        self._ctx = backend._kem_context(algorithm)
        self._lock = backend._injector.lock
        self._native = backend._oqs.native()
        self._encaps = backend._calls.encaps
        self._kem_addr = _address(self._ctx._kem)
        sizes = self._ctx._kem.contents
        if len(raw) != sizes.length_public_key:  # liboqs reads exactly that many bytes
            raise InvalidKey(f"{algorithm.name} public key must be {sizes.length_public_key} bytes")
        # output buffers of liboqs' own sizes, reused under the lock (held by every encapsulation)
        self._ct = ctypes.create_string_buffer(sizes.length_ciphertext)
        self._ss = ctypes.create_string_buffer(sizes.length_shared_secret)

    def public_bytes(self) -> bytes:
        return self._raw

    def encapsulate(self) -> tuple[bytes, bytes]:
        ct, ss = self._ct, self._ss
        with self._lock:
            if self._encaps(self._kem_addr, ct, ss, self._raw) != 0:
                raise InvalidKey(f"liboqs refused the {self.algorithm.name} public key")
            return ss.raw, ct.raw

    def _encapsulate_derand(self, m: bytes) -> tuple[bytes, bytes]:
        """Test vectors only: FIPS 203 ``Encaps_internal(ek, m)`` via ``OQS_KEM_encaps_derand``."""
        ctx = self._ctx
        ct = ctypes.create_string_buffer(ctx.length_ciphertext)
        ss = ctypes.create_string_buffer(ctx.length_shared_secret)
        pk = ctypes.create_string_buffer(self._raw, len(self._raw))
        seed = ctypes.create_string_buffer(m, len(m))
        rv = self._native.OQS_KEM_encaps_derand(ctx._kem, ct, ss, pk, seed)
        if rv != 0:
            raise CryptoError("OQS_KEM_encaps_derand failed")
        return ss.raw, ct.raw


class LiboqsMLKEMPrivateKey(KEMPrivateKey):
    __slots__ = ("algorithm", "_seed", "_kem", "_pk", "_ct_size", "_backend", "_public", "_decaps",
                 "_kem_addr", "_sk_addr")

    def __init__(self, backend: LiboqsBackend, algorithm: Algorithm, seed: bytes) -> None:
        self.algorithm = algorithm
        self._seed = seed
        self._backend = backend
        self._kem = kem = backend._oqs.KeyEncapsulation(_OQS_NAMES[algorithm.name])
        self._pk = kem.generate_keypair_seed(seed)  # OQS_KEM_keypair_derand(d || z)
        self._ct_size = algorithm.ciphertext_size
        self._public: LiboqsMLKEMPublicKey | None = None
        self._decaps = backend._calls.decaps
        self._kem_addr = _address(kem._kem)
        self._sk_addr = ctypes.addressof(kem.secret_key)  # liboqs-python's buffer, kept alive by _kem
        sizes = kem._kem.contents
        if (sizes.length_ciphertext, sizes.length_shared_secret) != (self._ct_size, 32):
            raise CryptoError(f"liboqs {algorithm.name} sizes differ from FIPS 203")  # pragma: no cover

    def __del__(self) -> None:
        # free() cleanses liboqs' expanded secret (OQS_MEM_cleanse) and releases the
        # native struct. __del__ rather than weakref.finalize: nothing to pay per key
        # created. Never raise from here (unset slot, or interpreter shutdown).
        try:
            self._kem.free()
        except Exception:  # noqa: BLE001
            pass

    def private_bytes(self) -> bytes:
        return self._seed

    def public_key(self) -> LiboqsMLKEMPublicKey:
        if self._public is None:
            self._public = LiboqsMLKEMPublicKey(self._backend, self.algorithm, self._pk)
        return self._public

    def decapsulate(self, ciphertext: bytes) -> bytes:
        if type(ciphertext) is not bytes or len(ciphertext) != self._ct_size:
            ciphertext = coerce_ciphertext(self.algorithm, ciphertext)
        ss = ctypes.create_string_buffer(32)  # per call: decapsulation takes no lock
        if self._decaps(self._kem_addr, ss, ciphertext, self._sk_addr) != 0:
            raise CryptoError(f"liboqs {self.algorithm.name} decapsulation failed")
        return ss.raw


# ---- ML-DSA ------------------------------------------------------------------------

class LiboqsMLDSAPublicKey(SignaturePublicKey):
    __slots__ = ("algorithm", "_raw", "_ctx", "_sig_size")

    def __init__(self, backend: LiboqsBackend, algorithm: Algorithm, raw: bytes) -> None:
        self.algorithm = algorithm
        self._raw = raw
        self._ctx = backend._sig_context(algorithm)
        self._sig_size = algorithm.signature_size

    def public_bytes(self) -> bytes:
        return self._raw

    def verify(self, signature: bytes, message: bytes, context: bytes = b"") -> bool:
        if type(context) is not bytes or len(context) > MAX_CONTEXT_BYTES:
            context = check_context(context)
        if type(message) is not bytes:
            message = as_bytes(message, "message")
        if type(signature) is not bytes:
            signature = as_bytes(signature, "signature")
        if len(signature) != self._sig_size:
            return False
        ok: bool = self._ctx.verify_with_ctx_str(message, signature, context, self._raw)
        return ok


class LiboqsMLDSAPrivateKey(SignaturePrivateKey):
    __slots__ = ("algorithm", "_seed", "_sig", "_pk", "_backend", "_lock", "_public", "_sign",
                 "_sig_addr", "_sk_addr", "_out", "_out_len", "_out_addr", "_sig_size")

    def __init__(self, backend: LiboqsBackend, algorithm: Algorithm, seed: bytes) -> None:
        self.algorithm = algorithm
        self._seed = seed
        self._backend = backend
        self._lock = backend._injector.lock
        self._sig = sig = backend._oqs.Signature(_OQS_NAMES[algorithm.name])
        self._pk = backend._injector.run(seed, sig.generate_keypair)  # KeyGen_internal(xi)
        self._public: LiboqsMLDSAPublicKey | None = None
        self._sign = backend._calls.sign
        self._sig_addr = _address(sig._sig)
        self._sk_addr = ctypes.addressof(sig.secret_key)  # liboqs-python's buffer, kept alive by _sig
        # the signature and its length, reused under the lock (which every signing holds)
        self._sig_size = sig._sig.contents.length_signature
        self._out = ctypes.create_string_buffer(self._sig_size)
        self._out_addr = ctypes.addressof(self._out)
        self._out_len = ctypes.c_size_t(0)

    def __del__(self) -> None:
        try:  # see LiboqsMLKEMPrivateKey.__del__
            self._sig.free()
        except Exception:  # noqa: BLE001
            pass

    def private_bytes(self) -> bytes:
        return self._seed

    def public_key(self) -> LiboqsMLDSAPublicKey:
        if self._public is None:
            self._public = LiboqsMLDSAPublicKey(self._backend, self.algorithm, self._pk)
        return self._public

    def sign(self, message: bytes, context: bytes = b"") -> bytes:
        if type(context) is not bytes or len(context) > MAX_CONTEXT_BYTES:
            context = check_context(context)
        if type(message) is not bytes:
            message = as_bytes(message, "message")
        out_len = self._out_len
        with self._lock:
            out_len.value = self._sig_size
            rv = self._sign(self._sig_addr, self._out_addr, ctypes.addressof(out_len), message, len(message),
                            context or None, len(context), self._sk_addr)
            if rv != 0 or out_len.value > self._sig_size:
                raise CryptoError(f"liboqs {self.algorithm.name} signing failed")
            return ctypes.string_at(self._out_addr, out_len.value)

    def _sign_derand(self, message: bytes, context: bytes, rnd: bytes) -> bytes:
        """Test vectors only: FIPS 204 signing with a chosen 32-byte ``rnd``."""
        signature: bytes = self._backend._injector.run(
            rnd, lambda: self._sig.sign_with_ctx_str(message, context)
        )
        return signature


# ---- the backend -------------------------------------------------------------------

class LiboqsBackend:
    """ML-KEM-768/1024 and ML-DSA-44/65/87 on liboqs; X-Wing and the composite with their
    post-quantum half on liboqs."""

    name = "liboqs"

    def __init__(self, probe: LiboqsProbe | None = None) -> None:
        probe = probe or probe_liboqs()
        self._probe = probe
        self._oqs, self._import_warnings = import_oqs(probe)
        self._injector = _RandomnessInjector(self._oqs.native())
        self._calls = _Native(self._oqs.native())
        self._contexts: dict[str, Any] = {}
        self.unsupported: dict[str, str] = {}  # algorithm name -> why not on this backend
        enabled_kems = set(self._oqs.get_enabled_kem_mechanisms())
        enabled_sigs = set(self._oqs.get_enabled_sig_mechanisms())
        for alg in (ML_KEM_768, ML_KEM_1024):
            if _OQS_NAMES[alg.name] not in enabled_kems:
                self.unsupported[alg.name] = f"{_OQS_NAMES[alg.name]} is not enabled in this liboqs build"
        for alg in (ML_DSA_44, ML_DSA_65, ML_DSA_87):
            if _OQS_NAMES[alg.name] not in enabled_sigs:
                self.unsupported[alg.name] = f"{_OQS_NAMES[alg.name]} is not enabled in this liboqs build"
            else:
                self._self_test_mldsa_seed(alg)
        if ML_KEM_768.name in self.unsupported:
            self.unsupported[X_WING.name] = self.unsupported[ML_KEM_768.name]
        if ML_DSA_65.name in self.unsupported:
            self.unsupported[ML_DSA_65_ECDSA_P256.name] = self.unsupported[ML_DSA_65.name]

        mlkem768_seed = lambda seed: LiboqsMLKEMPrivateKey(self, ML_KEM_768, seed)  # noqa: E731
        mlkem768_public = lambda raw: self._mlkem_load_public(ML_KEM_768, raw)  # noqa: E731
        mldsa65_seed = lambda seed: LiboqsMLDSAPrivateKey(self, ML_DSA_65, seed)  # noqa: E731
        mldsa65_public = lambda raw: LiboqsMLDSAPublicKey(self, ML_DSA_65, raw)  # noqa: E731
        self._ops: dict[str, _Ops] = {}
        for alg in (ML_KEM_768, ML_KEM_1024):
            self._ops[alg.name] = (
                (lambda a: lambda: LiboqsMLKEMPrivateKey(self, a, os.urandom(64)))(alg),
                (lambda a: lambda data: LiboqsMLKEMPrivateKey(self, a, check_private_length(a, data)))(alg),
                (lambda a: lambda data: self._mlkem_load_public(a, check_public_length(a, data)))(alg),
            )
        for alg in (ML_DSA_44, ML_DSA_65, ML_DSA_87):
            self._ops[alg.name] = (
                (lambda a: lambda: LiboqsMLDSAPrivateKey(self, a, os.urandom(32)))(alg),
                (lambda a: lambda data: LiboqsMLDSAPrivateKey(self, a, check_private_length(a, data)))(alg),
                (lambda a: lambda data: LiboqsMLDSAPublicKey(self, a, check_public_length(a, data)))(alg),
            )
        self._ops[X_WING.name] = (
            lambda: _hybrid.xwing_generate(mlkem768_seed),
            lambda data: _hybrid.xwing_load_private(data, mlkem768_seed),
            lambda data: _hybrid.xwing_load_public(data, mlkem768_public),
        )
        self._ops[ML_DSA_65_ECDSA_P256.name] = (
            lambda: _hybrid.composite_generate(mldsa65_seed),
            lambda data: _hybrid.composite_load_private(data, mldsa65_seed),
            lambda data: _hybrid.composite_load_public(data, mldsa65_public),
        )
        for name in self.unsupported:
            self._ops.pop(name, None)

    # -- liboqs objects ----------------------------------------------------------------

    def _kem_context(self, algorithm: Algorithm) -> Any:
        ctx = self._contexts.get(algorithm.name)
        if ctx is None:
            ctx = self._oqs.KeyEncapsulation(_OQS_NAMES[algorithm.name])
            weakref.finalize(self, ctx.free)
            ctx = self._contexts.setdefault(algorithm.name, ctx)
        return ctx

    def _sig_context(self, algorithm: Algorithm) -> Any:
        ctx = self._contexts.get(algorithm.name)
        if ctx is None:
            ctx = self._oqs.Signature(_OQS_NAMES[algorithm.name])
            weakref.finalize(self, ctx.free)
            ctx = self._contexts.setdefault(algorithm.name, ctx)
        return ctx

    def _mlkem_load_public(self, algorithm: Algorithm, raw: bytes) -> LiboqsMLKEMPublicKey:
        if not mlkem_encapsulation_key_ok(raw, _MLKEM_K[algorithm.name]):
            raise InvalidKey(f"{algorithm.name} public key fails the FIPS 203 modulus check")
        return LiboqsMLKEMPublicKey(self, algorithm, raw)

    def _self_test_mldsa_seed(self, algorithm: Algorithm) -> None:
        expected = (
            _CRYPTO_MLDSA[algorithm.name].from_seed_bytes(_SELF_TEST_SEED).public_key().public_bytes_raw()
        )
        try:
            key = LiboqsMLDSAPrivateKey(self, algorithm, _SELF_TEST_SEED)
        except CryptoError:
            got = None
        else:
            got = key.public_key().public_bytes()
        if got != expected:
            self.unsupported[algorithm.name] = (
                f"liboqs {_OQS_NAMES[algorithm.name]} key generation does not take the FIPS 204 seed "
                "through OQS_randombytes, so seed-form keys cannot be loaded"
            )

    # -- Backend protocol --------------------------------------------------------------

    def supports(self, algorithm: Algorithm) -> bool:
        name = getattr(algorithm, "name", algorithm)
        return name in self._ops

    def _ops_for(self, algorithm: Algorithm | str) -> _Ops:
        alg = resolve_algorithm(algorithm)
        ops = self._ops.get(alg.name)
        if ops is None:
            raise BackendUnavailable(
                f"{alg.name} is not available on the liboqs backend: {self.unsupported[alg.name]}")
        return ops

    def generate(self, algorithm: Algorithm | str) -> BasePrivateKey:
        return self._ops_for(algorithm)[0]()

    def load_private(self, algorithm: Algorithm | str, data: bytes) -> BasePrivateKey:
        return self._ops_for(algorithm)[1](data)

    def load_public(self, algorithm: Algorithm | str, data: bytes) -> BasePublicKey:
        return self._ops_for(algorithm)[2](data)

    def versions(self) -> dict[str, str]:
        out = {
            "backend": self.name,
            "liboqs": str(self._oqs.oqs_version()),
            "liboqs-python": str(self._oqs.oqs_python_version()),
            "liboqs-library": str(self._probe.library),
            "cryptography": cryptography.__version__,
            "openssl": openssl_version_text(),
        }
        if self._import_warnings:
            out["liboqs-warnings"] = "; ".join(self._import_warnings)
        return out

    def __repr__(self) -> str:
        return f"<LiboqsBackend liboqs {self._oqs.oqs_version()}>"
