"""Read what a TLS 1.3 handshake really put on the wire (test helper; pure, cryptography only).

OpenSSL's Python binding cannot tell which signature scheme the peer's CertificateVerify used,
and a test that only asks the library what it negotiated trusts the very thing it tests. So
this module decrypts a captured handshake, the way Wireshark does with an SSLKEYLOGFILE:

1. Split each direction's bytes into TLS records (5-byte header: type, legacy version, length).
2. The plaintext handshake records carry ClientHello and ServerHello; the ServerHello gives the
   cipher suite and the key_share group (a HelloRetryRequest, recognised by its fixed random,
   is skipped: the real ServerHello follows it).
3. The key log lines (``Context.set_keylog_callback``, NSS format) give each direction's
   handshake traffic secret; RFC 8446 section 7.3: key = HKDF-Expand-Label(secret, "key", "", key
   length), iv = HKDF-Expand-Label(secret, "iv", "", 12).
4. Every application_data record of a direction is opened with the suite's AEAD, nonce = iv XOR
   the record sequence number (from 0 per direction and key), additional data = the record
   header (RFC 8446 section 5.2); the inner plaintext ends with its real content type and zero
   padding. Handshake messages (1-byte type, 3-byte length) may span records, so the plaintexts
   are joined before parsing. A direction is read up to its Finished: later records are under
   the application traffic keys.
5. CertificateVerify (type 15) starts with the 2-byte SignatureScheme: 0x0905 mldsa65,
   0x0403 ecdsa_secp256r1_sha256.

``decrypt_handshake`` does steps 1-5 on bytes captured any way; ``handshake_facts`` runs a
handshake between two pyOpenSSL contexts over memory BIOs, captures both directions and the key
log, and decrypts it.
"""

from __future__ import annotations

import struct
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from OpenSSL import SSL

MLDSA65 = 0x0905
ECDSA_SECP256R1_SHA256 = 0x0403
X25519MLKEM768 = 0x11EC
X25519 = 0x001D

_HANDSHAKE, _APPLICATION_DATA, _ALERT, _CHANGE_CIPHER_SPEC = 22, 23, 21, 20
_CLIENT_HELLO, _SERVER_HELLO, _CERTIFICATE, _CERTIFICATE_VERIFY, _FINISHED = 1, 2, 11, 15, 20
_EXT_KEY_SHARE = 0x0033
# RFC 8446 section 4.1.3: a HelloRetryRequest is a ServerHello with this random.
_HRR_RANDOM = bytes.fromhex("CF21AD74E59A6111BE1D8C021E65B891C2A211167ABB8C5E079E09E2C8A8339C")


@dataclass(frozen=True)
class _Suite:
    key_length: int
    hash: hashes.HashAlgorithm
    aead: type[AESGCM] | type[ChaCha20Poly1305]


_SUITES = {
    0x1301: _Suite(16, hashes.SHA256(), AESGCM),  # TLS_AES_128_GCM_SHA256
    0x1302: _Suite(32, hashes.SHA384(), AESGCM),  # TLS_AES_256_GCM_SHA384
    0x1303: _Suite(32, hashes.SHA256(), ChaCha20Poly1305),  # TLS_CHACHA20_POLY1305_SHA256
}


def split_records(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """(content type, 5-byte header, fragment) of every whole record in ``data``."""
    records = []
    pos = 0
    while pos + 5 <= len(data):
        kind, _version, length = struct.unpack_from("!BHH", data, pos)
        if pos + 5 + length > len(data):
            break
        records.append((kind, data[pos:pos + 5], data[pos + 5:pos + 5 + length]))
        pos += 5 + length
    return records


def hkdf_expand_label(secret: bytes, label: bytes, context: bytes, length: int,
                      hash_algorithm: hashes.HashAlgorithm) -> bytes:
    """RFC 8446 section 7.1."""
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + struct.pack("!B", len(context)) + context
    return HKDFExpand(hash_algorithm, length, info).derive(secret)


def _messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + 4 <= len(data):
        kind = data[pos]
        length = int.from_bytes(data[pos + 1:pos + 4], "big")
        if pos + 4 + length > len(data):
            return
        yield kind, data[pos + 4:pos + 4 + length]
        pos += 4 + length


def _parse_server_hello(body: bytes) -> tuple[bytes, int, int | None]:
    """(random, cipher suite, key_share group) of a ServerHello body."""
    random = body[2:34]
    sid_len = body[34]
    pos = 35 + sid_len
    suite = int.from_bytes(body[pos:pos + 2], "big")
    pos += 3  # suite, legacy compression method
    ext_end = pos + 2 + int.from_bytes(body[pos:pos + 2], "big")
    pos += 2
    group = None
    while pos + 4 <= ext_end:
        ext_type, ext_len = struct.unpack_from("!HH", body, pos)
        if ext_type == _EXT_KEY_SHARE:
            group = int.from_bytes(body[pos + 4:pos + 6], "big")
        pos += 4 + ext_len
    return random, suite, group


def _keylog(lines: list[bytes]) -> dict[tuple[str, bytes], bytes]:
    """{(label, client random): secret} from NSS key log lines."""
    out = {}
    for line in lines:
        parts = line.strip().split()
        if len(parts) == 3:
            label, client_random, secret = (p.decode("ascii") for p in parts)
            out[(label, bytes.fromhex(client_random))] = bytes.fromhex(secret)
    return out


def _decrypt_direction(records: list[tuple[int, bytes, bytes]], secret: bytes,
                       suite: _Suite) -> tuple[list[tuple[int, bytes]], list[bytes]]:
    """The handshake messages and alerts of one direction's encrypted records, up to Finished."""
    key = hkdf_expand_label(secret, b"key", b"", suite.key_length, suite.hash)
    iv = hkdf_expand_label(secret, b"iv", b"", 12, suite.hash)
    aead = suite.aead(key)
    plain = b""
    alerts: list[bytes] = []
    seq = 0
    for kind, header, fragment in records:
        if kind != _APPLICATION_DATA:
            continue
        nonce = bytes(a ^ b for a, b in zip(iv, seq.to_bytes(12, "big"), strict=True))
        inner = aead.decrypt(nonce, fragment, header).rstrip(b"\x00")
        seq += 1
        inner_type, content = inner[-1], inner[:-1]
        if inner_type == _ALERT:
            alerts.append(content)
            break
        if inner_type != _HANDSHAKE:
            break
        plain += content
        if any(t == _FINISHED for t, _ in _messages(plain)):
            break
    return list(_messages(plain)), alerts


def _signature_scheme(messages: list[tuple[int, bytes]]) -> int | None:
    for kind, body in messages:
        if kind == _CERTIFICATE_VERIFY:
            return int.from_bytes(body[:2], "big")
    return None


def decrypt_handshake(client_to_server: bytes, server_to_client: bytes,
                      keylog_lines: list[bytes]) -> dict[str, Any]:
    """Facts of the TLS 1.3 handshake in the two captured byte streams.

    Keys: ``group`` and ``cipher_suite`` (ServerHello), ``server_sigalg`` and ``client_sigalg``
    (CertificateVerify schemes; None if that side sent none), ``server_messages`` and
    ``client_messages`` (encrypted handshake message types in order), ``client_alerts`` and
    ``server_alerts`` (alerts sent under the handshake keys), ``hello_retry`` (bool)."""
    c_records = split_records(client_to_server)
    s_records = split_records(server_to_client)
    hellos = b"".join(f for kind, _, f in c_records if kind == _HANDSHAKE)
    client_randoms = [body[2:34] for kind, body in _messages(hellos) if kind == _CLIENT_HELLO]
    if not client_randoms:
        raise ValueError("no ClientHello in the client's bytes")
    server_plain = b"".join(f for kind, _, f in s_records if kind == _HANDSHAKE)
    suite_id = group = None
    hello_retry = False
    for kind, body in _messages(server_plain):
        if kind == _SERVER_HELLO:
            random, suite_id, group = _parse_server_hello(body)
            hello_retry = hello_retry or random == _HRR_RANDOM
    if suite_id is None:
        raise ValueError("no ServerHello in the server's bytes")
    suite = _SUITES[suite_id]
    secrets = _keylog(keylog_lines)
    random = client_randoms[0]
    c_secret = secrets.get(("CLIENT_HANDSHAKE_TRAFFIC_SECRET", random))
    s_secret = secrets.get(("SERVER_HANDSHAKE_TRAFFIC_SECRET", random))
    if c_secret is None or s_secret is None:
        raise ValueError("the key log has no handshake traffic secrets for this ClientHello")
    s_messages, s_alerts = _decrypt_direction(s_records, s_secret, suite)
    c_messages, c_alerts = _decrypt_direction(c_records, c_secret, suite)
    return {
        "group": group,
        "cipher_suite": suite_id,
        "server_sigalg": _signature_scheme(s_messages),
        "client_sigalg": _signature_scheme(c_messages),
        "server_messages": [kind for kind, _ in s_messages],
        "client_messages": [kind for kind, _ in c_messages],
        "server_alerts": s_alerts,
        "client_alerts": c_alerts,
        "hello_retry": hello_retry,
    }


# ---- a captured handshake between two contexts ---------------------------------------------

_keylogs: weakref.WeakKeyDictionary[SSL.Connection, list[bytes]] = weakref.WeakKeyDictionary()
_logging_contexts: weakref.WeakSet[SSL.Context] = weakref.WeakSet()


def _record_keylog(conn: SSL.Connection, line: bytes) -> None:
    _keylogs.setdefault(conn, []).append(line)


def _pump(src: SSL.Connection, dst: SSL.Connection, capture: bytearray) -> bool:
    try:
        data = src.bio_read(1 << 20)
    except SSL.WantReadError:
        return False
    capture += data
    dst.bio_write(data)
    return bool(data)


def _step(conn: SSL.Connection, done: dict[str, object], name: str) -> None:
    if name in done:
        return
    try:
        conn.do_handshake()
        done[name] = True
    except SSL.WantReadError:
        pass
    except SSL.Error as exc:
        done[name] = exc


def run_handshake(client_ctx: SSL.Context, server_ctx: SSL.Context) -> dict[str, Any]:
    """Handshake a client and a server connection over memory BIOs, relaying every byte.

    Returns the two connections (``client``, ``server``), each side's outcome (True or the
    ``SSL.Error``), the bytes each way (``client_to_server``, ``server_to_client``) and the
    client's key log. After the client's handshake it reads once, so a refusal the server sends
    in answer to the client's certificate (TLS 1.3: after the client finished) reaches it."""
    if client_ctx not in _logging_contexts:
        client_ctx.set_keylog_callback(_record_keylog)
        _logging_contexts.add(client_ctx)
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    c2s, s2c = bytearray(), bytearray()
    done: dict[str, object] = {}
    for _ in range(20):
        _step(client, done, "client")
        moved = _pump(client, server, c2s)
        _step(server, done, "server")
        moved = _pump(server, client, s2c) or moved
        if not moved and "client" in done and "server" in done:
            break
    if done.get("client") is True:
        try:  # the server's verdict on our certificate arrives after our Finished
            client.recv(1)
        except SSL.WantReadError:
            pass
        except SSL.Error as exc:
            done["client"] = exc
    return {
        "client": client,
        "server": server,
        "client_result": done.get("client"),
        "server_result": done.get("server"),
        "client_to_server": bytes(c2s),
        "server_to_client": bytes(s2c),
        "keylog": list(_keylogs.get(client, [])),
    }


def handshake_facts(client_ctx: SSL.Context, server_ctx: SSL.Context) -> dict[str, Any]:
    """Run a handshake (``run_handshake``) and decrypt what went over the wire
    (``decrypt_handshake``); both connections' outcomes are included. Installs a key log
    callback on ``client_ctx`` (test contexts only)."""
    run = run_handshake(client_ctx, server_ctx)
    facts = decrypt_handshake(run["client_to_server"], run["server_to_client"], run["keylog"])
    facts.update(run)
    return facts
