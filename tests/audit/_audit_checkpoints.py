"""A checkpoint signer for tests: the two signature lines the KMS writes, from keys held here."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa

from qpher_proxy.audit.note import (
    ED25519_TYPE,
    MLDSA65_TYPE,
    Verifier,
    format_checkpoint,
    signature_line,
    signed_note,
)


class TestSigner:
    __test__ = False

    def __init__(self, origin: str = "test.example/audit") -> None:
        self.origin = origin
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.ml = mldsa.MLDSA65PrivateKey.generate()
        self.verifiers = [
            Verifier(origin, MLDSA65_TYPE, self.ml.public_key().public_bytes_raw()),
            Verifier(origin, ED25519_TYPE, self.ed.public_key().public_bytes_raw()),
        ]

    def vkeys(self) -> str:
        return "".join(v.vkey() + "\n" for v in self.verifiers)

    def note(self, size: int, root: bytes) -> str:
        text = format_checkpoint(self.origin, size, root)
        ml, ed = self.verifiers
        return signed_note(text, [
            signature_line(self.origin, ml.key_id, self.ml.sign(text.encode())),
            signature_line(self.origin, ed.key_id, self.ed.sign(text.encode())),
        ])
