"""TLS 1.3 session resumption: stateless tickets, key rotation by context generations, reload,
0-RTT refused, and ClientHellos whose pre_shared_key extension is garbage.

Real sockets on 127.0.0.1 and real handshakes; rotation is driven by calling ``rotate()`` or by
an injected clock, never by waiting.
"""

from __future__ import annotations

import datetime
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from _tls_helpers import (
    CLIENT_TIMEOUT,
    HTTP_REQUEST,
    HTTP_RESPONSE,
    Outcome,
    copy_pki,
    pyopenssl_client_context,
    read_to_eof,
    running_server,
    settings_for,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from qpher_proxy import errors
from qpher_proxy.tls import ServerTLSContextHolder, TLSEngine, TLSInfo, _openssl
from qpher_proxy.tls.certs import DevPKI, make_dev_pki
from qpher_proxy.tls.clienthello import parse_client_hello


@dataclass(frozen=True)
class Visit:
    session: SSL.Session | None
    reused: bool
    group: str | None
    response: bytes


def visit(port: int, ctx: SSL.Context, session: SSL.Session | None = None) -> Visit:
    """A blocking pyOpenSSL client: offer ``session``, one request, read to EOF, close_notify.

    The close_notify matters: OpenSSL marks a client session not resumable when its
    connection is freed without one (ssl_clear_bad_session)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", CLIENT_TIMEOUT, 0))
        conn = SSL.Connection(ctx, sock)
        conn.set_tlsext_host_name(b"localhost")
        if session is not None:
            conn.set_session(session)
        conn.set_connect_state()
        conn.do_handshake()
        conn.sendall(HTTP_REQUEST)
        response = read_to_eof(conn)
        try:
            conn.shutdown()
        except SSL.Error:
            pass
        return Visit(conn.get_session(), _openssl.session_reused(conn), conn.get_group_name(), response)


def _info(outcome: Outcome) -> TLSInfo:
    assert isinstance(outcome, TLSInfo), outcome
    return outcome


async def _visit(port: int, ctx: SSL.Context, session: SSL.Session | None = None) -> Visit:
    return await trio.to_thread.run_sync(visit, port, ctx, session)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_reconnect_with_the_saved_session_resumes_with_a_fresh_pq_key_exchange(pki: DevPKI) -> None:
    ctx = pyopenssl_client_context(pki.ca_cert)
    async with running_server(ServerTLSContextHolder(settings_for(pki))) as srv:
        first = await _visit(srv.port, ctx)
        full = _info(await srv.next_outcome())
        second = await _visit(srv.port, ctx, first.session)
        resumed = _info(await srv.next_outcome())
    assert first.response == second.response == HTTP_RESPONSE
    assert not first.reused and not full.resumed
    assert second.reused and resumed.resumed
    # psk_dhe_ke: the resumed handshake ran the hybrid key exchange again.
    assert second.group == "X25519MLKEM768" and resumed.group == "X25519MLKEM768" and resumed.post_quantum
    assert first.session is not None and _openssl.session_max_early_data(first.session) == 0  # no 0-RTT


async def test_require_pq_still_applies_to_resumed_handshakes(pki: DevPKI) -> None:
    holder = ServerTLSContextHolder(settings_for(pki, require_pq=True))
    ctx = pyopenssl_client_context(pki.ca_cert)
    async with running_server(holder) as srv:
        first = await _visit(srv.port, ctx)
        _info(await srv.next_outcome())
        second = await _visit(srv.port, ctx, first.session)
        assert _info(await srv.next_outcome()).resumed
        # The same session offered by a client that can only do a classical key exchange:
        # refused like any classical client, resumption does not bypass require_pq.
        # (pyOpenSSL only sets a session on its own context: narrow that context's groups
        # behind its back, through the raw binding.)
        assert _openssl.set_groups(ctx, ("X25519",))
        with pytest.raises(SSL.Error):
            await _visit(srv.port, ctx, second.session)
        failure = await srv.next_outcome()
    assert isinstance(failure, errors.TLSNotPostQuantum), failure


async def test_tickets_of_the_previous_key_resume_and_older_ones_do_not(pki: DevPKI) -> None:
    clock = FakeClock()
    holder = ServerTLSContextHolder(settings_for(pki, ticket_key_rotation=600), clock=clock)
    ctx = pyopenssl_client_context(pki.ca_cert)
    async with running_server(holder) as srv:
        old = await _visit(srv.port, ctx)
        _info(await srv.next_outcome())

        clock.now += 600  # due: the next accept rotates (the listener reads holder.current)
        after_one = await _visit(srv.port, ctx, old.session)
        assert _info(await srv.next_outcome()).resumed and after_one.reused
        assert holder.current.rotation == 1 and holder.current.previous is not None

        fresh = await _visit(srv.port, ctx)  # a full handshake: a ticket of the new key
        _info(await srv.next_outcome())

        clock.now += 600  # the key that issued `old` is now two generations back: dropped
        again = await _visit(srv.port, ctx, old.session)
        info = _info(await srv.next_outcome())
        assert not again.reused and not info.resumed  # a full handshake, no error
        assert again.response == HTTP_RESPONSE
        assert holder.current.rotation == 2
        # `after_one` resumed on the old key, which (OpenSSL encrypts with the connection's
        # context) also issued its new ticket: gone with that key.
        assert not (await _visit(srv.port, ctx, after_one.session)).reused
        _info(await srv.next_outcome())
        # `fresh` came from the key of rotation 1, the previous one now: still resumes.
        assert (await _visit(srv.port, ctx, fresh.session)).reused
        assert _info(await srv.next_outcome()).resumed


async def test_an_idle_server_keeps_no_expired_key_on_rotation(pki: DevPKI) -> None:
    clock = FakeClock()
    holder = ServerTLSContextHolder(settings_for(pki, ticket_key_rotation=600), clock=clock)
    ctx = pyopenssl_client_context(pki.ca_cert)
    async with running_server(holder) as srv:
        old = await _visit(srv.port, ctx)
        _info(await srv.next_outcome())
        clock.now += 1200  # nobody came for two periods: the old key's tickets are all expired
        assert not (await _visit(srv.port, ctx, old.session)).reused
        _info(await srv.next_outcome())
    assert holder.current.previous is None


async def test_a_rotation_that_finds_new_files_is_a_reload(pki: DevPKI, tmp_path: Path) -> None:
    live = copy_pki(pki, tmp_path / "live")
    holder = ServerTLSContextHolder(settings_for(live))
    before = holder.current
    fresh = make_dev_pki(tmp_path / "fresh", mldsa=False)
    for name in ("server.crt", "server.key"):
        (live.directory / name).write_bytes((fresh.directory / name).read_bytes())
    rotated = holder.rotate()
    assert rotated.previous is None and before.context not in rotated.key_names.values()


async def test_after_a_reload_no_earlier_ticket_resumes(pki: DevPKI) -> None:
    holder = ServerTLSContextHolder(settings_for(pki))
    ctx = pyopenssl_client_context(pki.ca_cert)
    async with running_server(holder) as srv:
        first = await _visit(srv.port, ctx)
        _info(await srv.next_outcome())
        holder.rotate()
        second = await _visit(srv.port, ctx, first.session)  # the previous key: resumes
        assert second.reused
        _info(await srv.next_outcome())
        holder.reload()
        assert holder.current.previous is None
        for session in (first.session, second.session):
            again = await _visit(srv.port, ctx, session)
            assert not again.reused and again.response == HTTP_RESPONSE
            assert not _info(await srv.next_outcome()).resumed


async def test_session_tickets_off_means_no_resumption(pki: DevPKI) -> None:
    holder = ServerTLSContextHolder(settings_for(pki, session_tickets=False))
    assert holder.current.key_name is None and not holder.current.key_names
    ctx = pyopenssl_client_context(pki.ca_cert)
    async with running_server(holder) as srv:
        first = await _visit(srv.port, ctx)
        _info(await srv.next_outcome())
        second = await _visit(srv.port, ctx, first.session)
        info = _info(await srv.next_outcome())
    assert not second.reused and not info.resumed


async def test_tls12_sessions_are_not_resumed(pki: DevPKI) -> None:
    """TLS 1.2 resumption reuses the old master secret with no key exchange: never offered."""
    ctx = pyopenssl_client_context(pki.ca_cert, max_version=SSL.TLS1_2_VERSION)
    async with running_server(ServerTLSContextHolder(settings_for(pki))) as srv:
        first = await _visit(srv.port, ctx)
        assert _info(await srv.next_outcome()).version == "TLSv1.2"
        second = await _visit(srv.port, ctx, first.session)
        info = _info(await srv.next_outcome())
    assert not second.reused and not info.resumed and info.group is not None


async def test_mtls_resumed_session_keeps_the_client_certificate(pki: DevPKI, tmp_path: Path) -> None:
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "client-r")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_file, key_file = tmp_path / "c.crt", tmp_path / "c.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    holder = ServerTLSContextHolder(settings_for(pki, client_auth="required", client_ca=pki.ca_cert))
    assert holder.current.key_name is not None  # learned although the context demands a certificate
    ctx = pyopenssl_client_context(pki.ca_cert, cert=(cert_file, key_file))
    async with running_server(holder) as srv:
        first = await _visit(srv.port, ctx)
        _info(await srv.next_outcome())
        second = await _visit(srv.port, ctx, first.session)
        info = _info(await srv.next_outcome())
    assert second.reused and info.resumed
    assert info.client_cert_subject is not None and "CN=client-r" in info.client_cert_subject


# ---- ClientHellos with a broken pre_shared_key extension -------------------------------------

def _client_hello_with_ticket(pki: DevPKI) -> bytes:
    """A real ClientHello offering a real ticket of a throw-away server (whole first record)."""
    holder = ServerTLSContextHolder(settings_for(pki))
    ctx = pyopenssl_client_context(pki.ca_cert)
    server = TLSEngine(holder.current.server_context, server_side=True)
    client = TLSEngine(ctx, server_side=False, server_hostname="localhost")
    for _ in range(6):
        client.do_handshake()
        data = client.data_to_send()
        if data:
            server.receive_data(data)
        server.do_handshake()
        out = server.data_to_send() + server.take_held()
        if out:
            client.receive_data(out)
    assert client.read(10) is not None
    conn = client._conn
    assert conn is not None
    session = conn.get_session()
    assert session is not None
    again = SSL.Connection(ctx, None)
    again.set_session(session)
    again.set_tlsext_host_name(b"localhost")
    again.set_connect_state()
    try:
        again.do_handshake()
    except SSL.WantReadError:
        pass
    hello = again.bio_read(65536)
    assert parse_client_hello(hello).ticket_key_name is not None
    return hello


def _psk_extension_offset(hello: bytes) -> int:
    """Offset of the pre_shared_key extension's type field (it is always the last one)."""
    pos = 5 + 4 + 2 + 32
    pos += 1 + hello[pos]
    pos += 2 + int.from_bytes(hello[pos : pos + 2], "big")
    pos += 1 + hello[pos]
    end = pos + 2 + int.from_bytes(hello[pos : pos + 2], "big")
    pos += 2
    while pos < end:
        kind = int.from_bytes(hello[pos : pos + 2], "big")
        if kind == 41:
            return pos
        pos += 4 + int.from_bytes(hello[pos + 2 : pos + 4], "big")
    raise AssertionError("no pre_shared_key extension")


def _with_psk_body(hello: bytes, body: bytes) -> bytes:
    """``hello`` with the pre_shared_key extension's body replaced, every length fixed up."""
    at = _psk_extension_offset(hello)
    out = bytearray(hello[:at] + b"\x00\x29" + len(body).to_bytes(2, "big") + body)
    delta = len(out) - len(hello)
    ext_len_at = 5 + 4 + 2 + 32
    ext_len_at += 1 + out[ext_len_at]
    ext_len_at += 2 + int.from_bytes(out[ext_len_at : ext_len_at + 2], "big")
    ext_len_at += 1 + out[ext_len_at]
    for pos, size in ((3, 2), (6, 3), (ext_len_at, 2)):  # record, handshake, extensions lengths
        value = int.from_bytes(out[pos : pos + size], "big") + delta
        out[pos : pos + size] = value.to_bytes(size, "big")
    return bytes(out)


def _mutations(hello: bytes) -> dict[str, bytes]:
    at = _psk_extension_offset(hello)
    ident_len_at = at + 4 + 2
    flip = bytearray(hello)
    flip[ident_len_at + 2] ^= 0xFF  # the first byte of the ticket's key name
    huge = bytearray(hello)
    huge[ident_len_at : ident_len_at + 2] = b"\xff\xff"  # an identity longer than everything
    ext_huge = bytearray(hello)
    ext_huge[at + 2 : at + 4] = b"\xff\xf0"  # the extension claims more than the record holds
    list_zero = bytearray(hello)
    list_zero[at + 4 : at + 6] = b"\x00\x00"  # an empty identities list
    return {
        "unknown-key-name": bytes(flip),
        "identity-too-long": bytes(huge),
        "extension-too-long": bytes(ext_huge),
        "empty-identities": bytes(list_zero),
        "truncated-record": hello[: at + 9],  # the header says more: then the client closes
        "garbage-body": _with_psk_body(hello, b"\x01\x02\x03"),
        "empty-body": _with_psk_body(hello, b""),
        "short-ticket": _with_psk_body(
            hello, b"\x00\x09\x00\x03abc\x00\x00\x00\x00" + b"\x00\x21\x20" + b"\x00" * 32),
        "huge-ticket": _with_psk_body(
            hello, (8006).to_bytes(2, "big") + (8000).to_bytes(2, "big") + b"\xaa" * 8000 + b"\x00" * 4
            + b"\x00\x21\x20" + b"\x00" * 32),
    }


@pytest.fixture(scope="module")
def offered_hello(pki: DevPKI) -> bytes:
    return _client_hello_with_ticket(pki)


_KINDS = ["unknown-key-name", "identity-too-long", "extension-too-long", "empty-identities",
          "truncated-record", "garbage-body", "empty-body", "short-ticket", "huge-ticket"]


@pytest.mark.parametrize("kind", _KINDS)
async def test_broken_psk_extensions_give_a_full_handshake_or_a_typed_failure(
    pki: DevPKI, offered_hello: bytes, kind: str
) -> None:
    """The server answers with a ServerHello (a full handshake begins: the ticket is simply not
    used) or an alert, and the connection ends as a typed handshake failure -- never anything
    else (an untyped exception would escape the server's handler and fail the test)."""
    hello = _mutations(offered_hello)[kind]
    async with running_server(ServerTLSContextHolder(settings_for(pki))) as srv:
        raw = await trio.open_tcp_stream("127.0.0.1", srv.port)
        async with raw:
            await raw.send_all(hello)
            if kind == "truncated-record":
                await raw.send_eof()
            with trio.fail_after(5):
                answer = await raw.receive_some()
        outcome = await srv.next_outcome()  # we close without finishing: a failure, typed
    assert isinstance(outcome, (errors.TLSHandshakeFailed, trio.BrokenResourceError)), outcome
    if kind in ("unknown-key-name", "short-ticket", "huge-ticket"):
        assert answer[:1] == b"\x16"  # well-formed: a ServerHello, i.e. a full handshake
    elif kind == "truncated-record":
        assert answer[:1] in (b"", b"\x15")  # EOF, or a decode_error alert first
    else:
        assert answer[:1] in (b"\x15", b"\x16")  # an alert (decode_error ...) or a ServerHello


def test_the_engine_sends_a_server_hello_to_a_hello_with_an_unknown_ticket(
    pki: DevPKI, offered_hello: bytes
) -> None:
    holder = ServerTLSContextHolder(settings_for(pki))
    server = TLSEngine(holder.current.server_context, server_side=True)
    server.receive_data(_mutations(offered_hello)["unknown-key-name"])
    assert server.do_handshake() is False  # no exception: a full handshake has begun
    assert server.data_to_send()[:1] == b"\x16"  # ServerHello (not an alert)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=0, max_value=4000))
def test_parser_never_raises_on_garbage_or_any_truncation(garbage: bytes, cut: int) -> None:
    parse_client_hello(garbage)
    parse_client_hello(b"\x16\x03\x01" + garbage)
    hello = _STATIC_HELLO[0] if _STATIC_HELLO else b""
    parse_client_hello(hello[:cut] + garbage)


_STATIC_HELLO: list[bytes] = []


@pytest.fixture(autouse=True, scope="module")
def _static_hello(offered_hello: bytes) -> None:
    _STATIC_HELLO[:] = [offered_hello]


def test_parser_reads_what_it_needs_and_nothing_on_doubt(offered_hello: bytes) -> None:
    facts = parse_client_hello(offered_hello)
    assert facts.offers_tls13 and facts.psk_identity is not None and len(facts.psk_identity) > 100
    for cut in range(len(offered_hello)):
        partial = parse_client_hello(offered_hello[:cut])
        assert partial.psk_identity is None  # an incomplete record tells nothing


def _move(src: SSL.Connection | TLSEngine, dst: SSL.Connection | TLSEngine) -> bytes:
    if isinstance(src, TLSEngine):
        data = src.data_to_send() + src.take_held()
    else:
        try:
            data = src.bio_read(65536)
        except SSL.WantReadError:
            data = b""
    if data:
        (dst.receive_data if isinstance(dst, TLSEngine) else dst.bio_write)(data)
    return data


def test_a_hello_arriving_one_byte_at_a_time_still_resumes(pki: DevPKI) -> None:
    """TCP may split a (post-quantum, ~1.6 KB) ClientHello: the context is chosen only once the
    whole first record is there, so the ticket is still found."""
    holder = ServerTLSContextHolder(settings_for(pki))
    ctx = pyopenssl_client_context(pki.ca_cert)
    server = TLSEngine(holder.current.server_context, server_side=True)
    client = TLSEngine(ctx, server_side=False, server_hostname="localhost")
    for _ in range(6):
        client.do_handshake()
        _move(client, server)
        server.do_handshake()
        _move(server, client)
    assert client.read(10) is not None and client._conn is not None
    session = client._conn.get_session()
    assert session is not None

    holder.rotate()  # and from the previous key, so the choice really matters
    server = TLSEngine(holder.current.server_context, server_side=True)
    again = SSL.Connection(ctx, None)
    again.set_session(session)
    again.set_tlsext_host_name(b"localhost")
    again.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        again.do_handshake()
    hello = again.bio_read(65536)
    for i in range(len(hello)):
        server.receive_data(hello[i : i + 1])
        assert server.do_handshake() is False
    for _ in range(4):
        _move(server, again)
        try:
            again.do_handshake()
        except SSL.WantReadError:
            pass
        _move(again, server)
        if server.do_handshake():
            break
    assert server.info is not None and server.info.resumed and server.info.group == "X25519MLKEM768"


def test_a_failed_rotation_keeps_the_current_key_and_retries_later(pki: DevPKI) -> None:
    from qpher_proxy.tls.context import ROTATION_RETRY, build_server_context

    clock = FakeClock()
    broken = [False]

    def builder(s: object) -> SSL.Context:
        if broken[0]:
            raise errors.ConfigError("tls.cert_file: cannot read it")
        return build_server_context(s)  # type: ignore[arg-type]

    holder = ServerTLSContextHolder(settings_for(pki, ticket_key_rotation=600), builder=builder, clock=clock)
    first = holder.current
    broken[0] = True
    clock.now += 600
    assert holder.current is first  # rotation failed: the current key keeps issuing
    broken[0] = False
    clock.now += ROTATION_RETRY / 2
    assert holder.current is first  # not retried before ROTATION_RETRY
    clock.now += ROTATION_RETRY
    assert holder.current.rotation == 1 and holder.current.previous is first.context
