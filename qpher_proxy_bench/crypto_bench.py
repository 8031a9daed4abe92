"""``qpher-proxy bench crypto``: operations per second, ours next to the raw library.

For every present backend and every algorithm it times key generation,
encapsulate/decapsulate (KEMs), HPKE seal/open of 1 KiB (KEMs) and sign/verify of a
1 KiB message (signatures), each next to the same operation written directly against
the underlying library in the same run, and prints the wrapper's overhead.

"Raw" means:
- openssl: the ``cryptography`` call itself (``MLKEM768PrivateKey.generate()``,
  ``pub.encapsulate()``, ``hpke.Suite(...).encrypt(...)``, ``key.sign(...)``...).
- liboqs: liboqs-python's method on a prepared object (``KeyEncapsulation.encap_secret``,
  ``Signature.sign_with_ctx_str``...; keygen = new object + ``generate_keypair`` + ``free``).
- hybrids (X-Wing, composite) and HPKE on liboqs, which no library offers as one call:
  the same construction written inline on the library calls (no checks, no wrapper
  objects), so the difference is exactly our wrapper's cost.
HPKE raw runs with empty associated data (``cryptography``'s API has none); ours too.

Measurements alternate ours/raw batches and compare medians, which is what survives a
shared, noisy machine best. ``--quick`` finishes in well under a minute.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from qpher_proxy.crypto.algorithms import ALGORITHMS, Kind

PAYLOAD = bytes(range(256)) * 4  # 1 KiB
INFO = b"qpher/v1/encrypt"
MIN_BATCH = 20


@dataclass(frozen=True, slots=True)
class Result:
    backend: str
    algorithm: str
    operation: str
    ours_ops: float
    raw_ops: float

    @property
    def overhead_pct(self) -> float:
        return (self.raw_ops / self.ours_ops - 1.0) * 100.0 if self.ours_ops else float("inf")


# ---- timing ------------------------------------------------------------------------

def _batch(fn: Callable[[], Any], n: int) -> float:
    # CPU time of this process, not wall time: on a shared machine the time other
    # processes hold the cores would otherwise land on whichever side was running.
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n


def measure(
    ours: Callable[[], Any], raw: Callable[[], Any], seconds: float, rounds: int
) -> tuple[float, float]:
    """Median-of-``rounds`` ops/s for ours and raw; batches alternate so drift and other
    processes hit both sides alike, and each batch has at least 20 calls so that
    variable-time operations (ML-DSA's rejection sampling) average out."""
    once = max(_batch(raw, 3), _batch(ours, 3), 1e-7)
    n = max(MIN_BATCH, int(seconds / once))
    ours_t: list[float] = []
    raw_t: list[float] = []
    for _ in range(rounds):
        raw_t.append(_batch(raw, n))
        ours_t.append(_batch(ours, n))
    return 1.0 / statistics.median(ours_t), 1.0 / statistics.median(raw_t)


# ---- raw library operations ----------------------------------------------------------

def _openssl_raw(alg_name: str, key: Any) -> dict[str, Callable[[], Any]]:
    from cryptography.hazmat.primitives import hashes, hpke
    from cryptography.hazmat.primitives.asymmetric import ec, mldsa, mlkem, x25519

    from qpher_proxy.kms.worker.backends._hybrid import (
        COMPOSITE_LABEL,
        COMPOSITE_PREFIX,
        XWING_LABEL,
        xwing_expand,
    )

    seed = key.private_bytes()
    ops: dict[str, Callable[[], Any]] = {}
    if alg_name in ("ml-kem-768", "ml-kem-1024"):
        cls = mlkem.MLKEM768PrivateKey if alg_name == "ml-kem-768" else mlkem.MLKEM1024PrivateKey
        kem = hpke.KEM.MLKEM768 if alg_name == "ml-kem-768" else hpke.KEM.MLKEM1024
        priv = cls.from_seed_bytes(seed)
        pub = priv.public_key()
        ct = pub.encapsulate()[1]
        suite = hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
        sealed = suite.encrypt(PAYLOAD, pub, INFO)
        ops.update(keygen=cls.generate, encapsulate=pub.encapsulate, decapsulate=lambda: priv.decapsulate(ct),
                   hpke_seal=lambda: suite.encrypt(PAYLOAD, pub, INFO),
                   hpke_open=lambda: suite.decrypt(sealed, priv, INFO))
    elif alg_name == "x-wing":
        dz, sk_x = xwing_expand(seed)
        m_priv = mlkem.MLKEM768PrivateKey.from_seed_bytes(dz)
        m_pub = m_priv.public_key()
        x_priv = x25519.X25519PrivateKey.from_private_bytes(sk_x)
        pk_x = x_priv.public_key().public_bytes_raw()
        x_pub = x25519.X25519PublicKey.from_public_bytes(pk_x)

        def keygen() -> Any:
            d, s = xwing_expand(os.urandom(32))
            m = mlkem.MLKEM768PrivateKey.from_seed_bytes(d)
            x = x25519.X25519PrivateKey.from_private_bytes(s)
            return m, x, x.public_key().public_bytes_raw()

        def encapsulate() -> tuple[bytes, bytes]:
            ek = x25519.X25519PrivateKey.generate()
            ss_m, ct_m = m_pub.encapsulate()
            ss_x = ek.exchange(x_pub)
            ct_x = ek.public_key().public_bytes_raw()
            return hashlib.sha3_256(ss_m + ss_x + ct_x + pk_x + XWING_LABEL).digest(), ct_m + ct_x

        ct = encapsulate()[1]

        def decapsulate() -> bytes:
            ss_m = m_priv.decapsulate(ct[:1088])
            ss_x = x_priv.exchange(x25519.X25519PublicKey.from_public_bytes(ct[1088:]))
            return hashlib.sha3_256(ss_m + ss_x + ct[1088:] + pk_x + XWING_LABEL).digest()

        h_priv = hpke.MLKEM768X25519PrivateKey(m_priv, x_priv)
        h_pub = hpke.MLKEM768X25519PublicKey(m_pub, x_pub)
        suite = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
        sealed = suite.encrypt(PAYLOAD, h_pub, INFO)
        ops.update(keygen=keygen, encapsulate=encapsulate, decapsulate=decapsulate,
                   hpke_seal=lambda: suite.encrypt(PAYLOAD, h_pub, INFO),
                   hpke_open=lambda: suite.decrypt(sealed, h_priv, INFO))
    elif alg_name in ("ml-dsa-44", "ml-dsa-65", "ml-dsa-87"):
        dsa_classes: dict[
            str, type[mldsa.MLDSA44PrivateKey | mldsa.MLDSA65PrivateKey | mldsa.MLDSA87PrivateKey]
        ] = {
            "ml-dsa-44": mldsa.MLDSA44PrivateKey,
            "ml-dsa-65": mldsa.MLDSA65PrivateKey,
            "ml-dsa-87": mldsa.MLDSA87PrivateKey,
        }
        dsa_cls = dsa_classes[alg_name]
        dsa_priv = dsa_cls.from_seed_bytes(seed)
        dsa_pub = dsa_priv.public_key()
        sig = dsa_priv.sign(PAYLOAD, b"")
        ops.update(keygen=dsa_cls.generate, sign=lambda: dsa_priv.sign(PAYLOAD, b""),
                   verify=lambda: dsa_pub.verify(sig, PAYLOAD, b""))
    elif alg_name == "ml-dsa-65-ecdsa-p256":
        from cryptography.hazmat.primitives.serialization import load_der_private_key

        c_priv = mldsa.MLDSA65PrivateKey.from_seed_bytes(seed[:32])
        c_pub = c_priv.public_key()
        e_priv = load_der_private_key(seed[32:], None)
        assert isinstance(e_priv, ec.EllipticCurvePrivateKey)
        e_pub = e_priv.public_key()
        algo = ec.ECDSA(hashes.SHA256())

        def m_prime() -> bytes:
            return COMPOSITE_PREFIX + COMPOSITE_LABEL + b"\x00" + hashlib.sha512(PAYLOAD).digest()

        def sign() -> bytes:
            mp = m_prime()
            return c_priv.sign(mp, COMPOSITE_LABEL) + e_priv.sign(mp, algo)

        sig = sign()

        def verify() -> None:
            mp = m_prime()
            c_pub.verify(sig[:3309], mp, COMPOSITE_LABEL)
            e_pub.verify(sig[3309:], mp, algo)

        ops.update(
            keygen=lambda: (mldsa.MLDSA65PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())),
            sign=sign,
            verify=verify,
        )
    return ops


def _inline_hpke(kem_id: int) -> tuple[Callable[[bytes], bytes], Callable[[bytes, bytes], bytes]]:
    """RFC 9180 single-shot AEAD part written inline on hmac + AESGCM (no caching)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    suite_id = b"HPKE" + kem_id.to_bytes(2, "big") + b"\x00\x01\x00\x02"
    pre = b"HPKE-v1" + suite_id

    def keys(ss: bytes) -> tuple[bytes, bytes]:
        ksc = (b"\x00" + hmac.digest(b"", pre + b"psk_id_hash", "sha256")
               + hmac.digest(b"", pre + b"info_hash" + INFO, "sha256"))
        secret = hmac.digest(ss, pre + b"secret", "sha256")
        key = hmac.digest(secret, b"\x00\x20" + pre + b"key" + ksc + b"\x01", "sha256")
        nonce = hmac.digest(secret, b"\x00\x0c" + pre + b"base_nonce" + ksc + b"\x01", "sha256")[:12]
        return key, nonce

    def seal(ss: bytes) -> bytes:
        key, nonce = keys(ss)
        return AESGCM(key).encrypt(nonce, PAYLOAD, b"")

    def open_(ss: bytes, ct: bytes) -> bytes:
        key, nonce = keys(ss)
        return AESGCM(key).decrypt(nonce, ct, b"")

    return seal, open_


def _liboqs_raw(alg_name: str, key: Any) -> dict[str, Callable[[], Any]]:
    import oqs
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, x25519

    from qpher_proxy.kms.worker.backends._hybrid import (
        COMPOSITE_LABEL,
        COMPOSITE_PREFIX,
        XWING_LABEL,
        xwing_expand,
    )

    names = {"ml-kem-768": "ML-KEM-768", "ml-kem-1024": "ML-KEM-1024", "ml-dsa-44": "ML-DSA-44",
             "ml-dsa-65": "ML-DSA-65", "ml-dsa-87": "ML-DSA-87"}
    seed = key.private_bytes()
    ops: dict[str, Callable[[], Any]] = {}

    def kem_keygen(name: str) -> Callable[[], Any]:
        def keygen() -> bytes:
            k = oqs.KeyEncapsulation(name)
            pk = k.generate_keypair()
            k.free()
            return pk
        return keygen

    def sig_keygen(name: str) -> Callable[[], Any]:
        def keygen() -> bytes:
            s = oqs.Signature(name)
            pk = s.generate_keypair()
            s.free()
            return pk
        return keygen

    if alg_name in ("ml-kem-768", "ml-kem-1024", "x-wing"):
        name = names.get(alg_name, "ML-KEM-768")
        ctx = oqs.KeyEncapsulation(name)
        kem = oqs.KeyEncapsulation(name)
        if alg_name == "x-wing":
            dz, sk_x = xwing_expand(seed)
            pk = kem.generate_keypair_seed(dz)
            x_priv = x25519.X25519PrivateKey.from_private_bytes(sk_x)
            pk_x = x_priv.public_key().public_bytes_raw()
            x_pub = x25519.X25519PublicKey.from_public_bytes(pk_x)

            def keygen() -> Any:
                d, s = xwing_expand(os.urandom(32))
                k = oqs.KeyEncapsulation(name)
                k.generate_keypair_seed(d)
                x = x25519.X25519PrivateKey.from_private_bytes(s)
                k.free()
                return x.public_key().public_bytes_raw()

            def encapsulate() -> tuple[bytes, bytes]:
                ek = x25519.X25519PrivateKey.generate()
                ct_m, ss_m = ctx.encap_secret(pk)
                ss_x = ek.exchange(x_pub)
                ct_x = ek.public_key().public_bytes_raw()
                return hashlib.sha3_256(ss_m + ss_x + ct_x + pk_x + XWING_LABEL).digest(), ct_m + ct_x

            ct = encapsulate()[1]

            def decapsulate() -> bytes:
                ss_m = kem.decap_secret(ct[:1088])
                ss_x = x_priv.exchange(x25519.X25519PublicKey.from_public_bytes(ct[1088:]))
                return hashlib.sha3_256(ss_m + ss_x + ct[1088:] + pk_x + XWING_LABEL).digest()

            kem_id = 0x647A
        else:
            pk = kem.generate_keypair_seed(seed)
            keygen = kem_keygen(name)

            def encapsulate() -> tuple[bytes, bytes]:
                ct_, ss_ = ctx.encap_secret(pk)
                return ss_, ct_

            ct = encapsulate()[1]

            def decapsulate() -> bytes:
                return kem.decap_secret(ct)

            kem_id = 0x0041 if alg_name == "ml-kem-768" else 0x0042
        seal, open_ = _inline_hpke(kem_id)

        def hpke_seal() -> bytes:
            ss, enc = encapsulate()
            return enc + seal(ss)

        sealed = hpke_seal()
        n = len(ct)

        def hpke_open() -> bytes:
            return open_(decapsulate_of(sealed[:n]), sealed[n:])

        def decapsulate_of(c: bytes) -> bytes:
            if alg_name == "x-wing":
                ss_m = kem.decap_secret(c[:1088])
                ss_x = x_priv.exchange(x25519.X25519PublicKey.from_public_bytes(c[1088:]))
                return hashlib.sha3_256(ss_m + ss_x + c[1088:] + pk_x + XWING_LABEL).digest()
            return kem.decap_secret(c)

        ops.update(keygen=keygen, encapsulate=encapsulate, decapsulate=decapsulate, hpke_seal=hpke_seal,
                   hpke_open=hpke_open)
    elif alg_name in ("ml-dsa-44", "ml-dsa-65", "ml-dsa-87"):
        name = names[alg_name]
        signer = key._sig  # liboqs object holding the same expanded secret
        verifier = oqs.Signature(name)
        pk = key.public_key().public_bytes()
        sig = signer.sign_with_ctx_str(PAYLOAD, b"")
        ops.update(keygen=sig_keygen(name), sign=lambda: signer.sign_with_ctx_str(PAYLOAD, b""),
                   verify=lambda: verifier.verify_with_ctx_str(PAYLOAD, sig, b"", pk))
    elif alg_name == "ml-dsa-65-ecdsa-p256":
        from cryptography.hazmat.primitives.serialization import load_der_private_key

        signer = key._mldsa._sig
        verifier = oqs.Signature("ML-DSA-65")
        pk = key.public_key().public_bytes()[:1952]
        e_priv = load_der_private_key(seed[32:], None)
        assert isinstance(e_priv, ec.EllipticCurvePrivateKey)
        e_pub = e_priv.public_key()
        algo = ec.ECDSA(hashes.SHA256())

        def m_prime() -> bytes:
            return COMPOSITE_PREFIX + COMPOSITE_LABEL + b"\x00" + hashlib.sha512(PAYLOAD).digest()

        def sign() -> bytes:
            mp = m_prime()
            return signer.sign_with_ctx_str(mp, COMPOSITE_LABEL) + e_priv.sign(mp, algo)

        sig = sign()

        def verify() -> bool:
            mp = m_prime()
            ok = verifier.verify_with_ctx_str(mp, sig[:3309], COMPOSITE_LABEL, pk)
            e_pub.verify(sig[3309:], mp, algo)
            return bool(ok)

        def keygen() -> Any:
            s = oqs.Signature("ML-DSA-65")
            s.generate_keypair()
            s.free()
            return ec.generate_private_key(ec.SECP256R1())

        ops.update(keygen=keygen, sign=sign, verify=verify)
    return ops


# ---- our operations ------------------------------------------------------------------

def _our_ops(backend: Any, alg_name: str, key: Any) -> dict[str, Callable[[], Any]]:
    pub = key.public_key()
    if ALGORITHMS[alg_name].kind is Kind.KEM:
        ct = pub.encapsulate()[1]
        sealed = pub.hpke_seal(PAYLOAD, info=INFO)
        return {
            "keygen": lambda: backend.generate(alg_name),
            "encapsulate": pub.encapsulate,
            "decapsulate": lambda: key.decapsulate(ct),
            "hpke_seal": lambda: pub.hpke_seal(PAYLOAD, info=INFO),
            "hpke_open": lambda: key.hpke_open(sealed, info=INFO),
        }
    sig = key.sign(PAYLOAD)
    return {
        "keygen": lambda: backend.generate(alg_name),
        "sign": lambda: key.sign(PAYLOAD),
        "verify": lambda: pub.verify(sig, PAYLOAD),
    }


def raw_table(backend_name: str, alg_name: str) -> tuple[Any, dict[str, Callable[[], Any]]]:
    """A fresh key of ``alg_name`` on ``backend_name`` and the raw library calls on it (the table
    ``run`` compares with). Keep the key as long as the calls: liboqs' raw calls use objects the
    key frees on collection."""
    from qpher_proxy.kms.worker.backends import select_backend

    backend = select_backend(backend_name)
    key = backend.generate(ALGORITHMS[alg_name])
    factory = _openssl_raw if backend.name == "openssl" else _liboqs_raw
    return key, factory(alg_name, key)


def run(backends: Sequence[str], algorithms: Sequence[str], seconds: float, rounds: int,
        progress: Callable[[str], None] | None = None) -> tuple[list[Result], dict[str, dict[str, str]]]:
    from qpher_proxy.kms.worker.backends import select_backend

    results: list[Result] = []
    versions: dict[str, dict[str, str]] = {}
    for backend_name in backends:
        backend = select_backend(backend_name)
        versions[backend_name] = backend.versions()
        raw_factory = _openssl_raw if backend_name == "openssl" else _liboqs_raw
        for alg_name in algorithms:
            key = backend.generate(ALGORITHMS[alg_name])
            ours = _our_ops(backend, alg_name, key)
            raw = raw_factory(alg_name, key)
            for op, fn in ours.items():
                if progress:
                    progress(f"{backend_name} {alg_name} {op}")
                ours_ops, raw_ops = measure(fn, raw[op], seconds, rounds)
                results.append(Result(backend_name, alg_name, op, ours_ops, raw_ops))
    return results, versions


def format_table(results: Sequence[Result], versions: dict[str, dict[str, str]]) -> str:
    lines = []
    for name, info in versions.items():
        lines.append(f"# {name}: " + ", ".join(f"{k} {v}" for k, v in info.items() if k != "backend"))
    header = (f"{'backend':8} {'algorithm':21} {'operation':12} {'ours ops/s':>12} {'raw ops/s':>12} "
              f"{'overhead':>9}")
    lines += [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.backend:8} {r.algorithm:21} {r.operation:12} {r.ours_ops:12.0f} {r.raw_ops:12.0f} "
                     f"{r.overhead_pct:+8.1f}%")
    worst = max(results, key=lambda r: r.overhead_pct, default=None)
    if worst is not None:
        mean = sum(r.overhead_pct for r in results) / len(results)
        lines.append(f"mean overhead {mean:+.1f}%, worst {worst.overhead_pct:+.1f}% "
                     f"({worst.backend} {worst.algorithm} {worst.operation})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from qpher_proxy.kms.worker.backends import available_backends

    parser = argparse.ArgumentParser(prog="qpher-proxy bench crypto",
                                     description=__doc__.split("\n")[0].replace("``", ""))
    parser.add_argument("--quick", action="store_true", help="short measurements (under a minute in all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--backend", action="append", choices=["openssl", "liboqs"],
                        help="only this backend (repeatable); default: every present backend")
    parser.add_argument("--algorithm", action="append", choices=sorted(ALGORITHMS),
                        help="only this algorithm (repeatable); default: all")
    parser.add_argument("--seconds", type=float, default=None, help="time per measurement loop")
    parser.add_argument("--rounds", type=int, default=None, help="measurement rounds (best is kept)")
    args = parser.parse_args(argv)

    present = available_backends()
    backends = args.backend or present
    missing = [b for b in backends if b not in present]
    if missing:
        from qpher_proxy.kms.worker.backends import liboqs_status

        print(f"backend not available: {', '.join(missing)} ({liboqs_status()[1]})", file=sys.stderr)
        return 2
    algorithms = args.algorithm or list(ALGORITHMS)
    seconds = args.seconds if args.seconds is not None else (0.01 if args.quick else 0.05)
    rounds = args.rounds if args.rounds is not None else (9 if args.quick else 25)
    progress = None if args.json or not sys.stderr.isatty() else (
        lambda text: print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True))
    results, versions = run(backends, algorithms, seconds, rounds, progress)
    if progress:
        print("\r\033[K", end="", file=sys.stderr)
    if args.json:
        print(json.dumps({
            "versions": versions,
            "payload_bytes": len(PAYLOAD),
            "results": [{**asdict(r), "overhead_pct": round(r.overhead_pct, 2)} for r in results],
        }, indent=2))
    else:
        print(format_table(results, versions))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
