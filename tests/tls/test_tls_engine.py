"""The sans-I/O engine: pairs of engines talking through nothing but bytes (h11 style)."""

from __future__ import annotations

import pytest
from _tls_helpers import pyopenssl_client_context, settings_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from qpher_proxy import errors
from qpher_proxy.tls import NEED_DATA, TLSEngine, _openssl, build_server_context
from qpher_proxy.tls.certs import DevPKI


def _pair(server_ctx: SSL.Context, client_ctx: SSL.Context, **server_kw: bool) -> tuple[TLSEngine, TLSEngine]:
    return (
        TLSEngine(server_ctx, server_side=True, **server_kw),
        TLSEngine(client_ctx, server_side=False, server_hostname="localhost"),
    )


def _handshake(server: TLSEngine, client: TLSEngine, *, byte_at_a_time: bool = False) -> None:
    for _ in range(10):
        client_done = client.do_handshake()
        _deliver(client, server, byte_at_a_time)
        server_done = server.do_handshake()
        _deliver(server, client, byte_at_a_time)
        if client_done and server_done:
            return
    raise AssertionError("handshake did not converge")


def _deliver(src: TLSEngine, dst: TLSEngine, byte_at_a_time: bool = False) -> None:
    data = src.data_to_send()
    if byte_at_a_time:
        for i in range(len(data)):
            dst.receive_data(data[i : i + 1])
    elif data:
        dst.receive_data(data)


def _read_all(engine: TLSEngine) -> bytes:
    out = b""
    while True:
        chunk = engine.read(1 << 20)
        if chunk is NEED_DATA or chunk == b"":
            return out
        assert isinstance(chunk, bytes)
        out += chunk


@pytest.fixture
def contexts(pki: DevPKI) -> tuple[SSL.Context, SSL.Context]:
    return build_server_context(settings_for(pki)), pyopenssl_client_context(pki.ca_cert)


def test_handshake_then_data_both_ways(contexts: tuple[SSL.Context, SSL.Context]) -> None:
    server, client = _pair(*contexts)
    assert server.info is None and server.read(10) is NEED_DATA
    _handshake(server, client)
    assert server.info is not None and server.info.group == "X25519MLKEM768" and server.info.post_quantum
    client.write(b"ping")
    _deliver(client, server)
    assert server.read(100) == b"ping"
    server.write(b"pong")
    _deliver(server, client)
    assert _read_all(client) == b"pong"


def test_handshake_fed_one_byte_at_a_time(contexts: tuple[SSL.Context, SSL.Context]) -> None:
    server, client = _pair(*contexts)
    _handshake(server, client, byte_at_a_time=True)
    assert server.info is not None and client.info is not None
    assert server.info.cipher == client.info.cipher


def test_server_holds_session_tickets_until_it_sends_something(
    contexts: tuple[SSL.Context, SSL.Context],
) -> None:
    """The engine alone holds them (the stream over a real socket takes them with take_held()
    right after the handshake, see test_tls_stream.py; other transports keep this behaviour)."""
    server, client = _pair(*contexts)
    _handshake(server, client)
    assert server.data_to_send() == b""  # tickets held back, not sent on their own
    server.write(b"response")
    out = server.data_to_send()
    assert len(out) > len(b"response") + 100  # tickets, then the record
    client.receive_data(out)
    assert _read_all(client) == b"response"
    assert client._conn is not None and client._conn.get_session() is not None


def test_take_held_hands_out_the_tickets_once_and_order_is_kept(
    contexts: tuple[SSL.Context, SSL.Context],
) -> None:
    server, client = _pair(*contexts)
    _handshake(server, client)
    held = server.take_held()
    assert len(held) > 100 and server.take_held() == b""
    server.write(b"response")
    client.receive_data(held + server.data_to_send())  # the tickets first, then the record
    assert _read_all(client) == b"response"


def test_read_gathers_buffered_records_up_to_max_bytes(contexts: tuple[SSL.Context, SSL.Context]) -> None:
    server, client = _pair(*contexts)
    _handshake(server, client)
    client.write(b"a" * 100_000)
    _deliver(client, server)
    first = server.read(64 * 1024)
    assert first == b"a" * (64 * 1024)
    assert server.read(64 * 1024) == b"a" * (100_000 - 64 * 1024)
    assert server.read(64 * 1024) is NEED_DATA


def test_close_notify_is_a_half_close(contexts: tuple[SSL.Context, SSL.Context]) -> None:
    server, client = _pair(*contexts)
    _handshake(server, client)
    client.write(b"last words")
    client.close_notify()
    _deliver(client, server)
    assert server.read(100) == b"last words"
    assert server.read(100) == b""
    assert server.read(100) == b""  # EOF is sticky
    server.write(b"reply after your close_notify")  # TLS 1.3: our direction is still open
    _deliver(server, client)
    assert _read_all(client) == b"reply after your close_notify"


def test_transport_eof_without_close_notify_is_truncation(contexts: tuple[SSL.Context, SSL.Context]) -> None:
    server, client = _pair(*contexts)
    _handshake(server, client)
    server.receive_data(b"")
    with pytest.raises(errors.TLSError) as caught:
        server.read(100)
    assert caught.value.reason == "truncated"


def test_trailing_garbage_after_the_handshake_is_a_record_error(
    contexts: tuple[SSL.Context, SSL.Context],
) -> None:
    server, client = _pair(*contexts)
    _handshake(server, client)
    client.write(b"fine")
    server.receive_data(client.data_to_send() + b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
    assert server.read(100) == b"fine"
    with pytest.raises(errors.TLSError) as caught:
        server.read(100)
    assert caught.value.reason == "protocol_error" and caught.value.code == "tls_error"
    assert server.failed


@pytest.mark.parametrize(
    ("first_bytes", "error", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", errors.TLSPlaintextOnTLSPort, "plaintext_http"),
        (b"POST /v1/sign HTTP/1.1\r\n", errors.TLSPlaintextOnTLSPort, "plaintext_http"),
        (b"\x16\x03\x01\x00\x05hello", errors.TLSHandshakeFailed, "protocol_error"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", errors.TLSHandshakeFailed, "not_tls"),
        # an SSLv2 ClientHello (scanners probe for SSLv2 with one): a version, not noise
        (
            b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + b"\x07\x00\xc0" * 7 + b"\x00" * 16,
            errors.TLSHandshakeFailed,
            "unsupported_version",
        ),
        # an SSLv3 ClientHello
        (
            b"\x16\x03\x00\x00\x2f\x01\x00\x00\x2b\x03\x00"
            + b"\x00" * 32
            + b"\x00\x00\x04\x00\x2f\x00\x35\x01\x00",
            errors.TLSHandshakeFailed,
            "unsupported_version",
        ),
    ],
    ids=["http-get", "http-post", "bad-record", "ssh", "sslv2-hello", "sslv3-hello"],
)
def test_non_tls_first_bytes_are_typed_handshake_failures(
    contexts: tuple[SSL.Context, SSL.Context], first_bytes: bytes, error: type, reason: str
) -> None:
    server = TLSEngine(contexts[0], server_side=True)
    server.receive_data(first_bytes)
    with pytest.raises(error) as caught:
        server.do_handshake()
    assert caught.value.reason == reason
    assert first_bytes[:8].decode("latin-1") not in caught.value.message  # never echo peer input


def test_eof_during_handshake(contexts: tuple[SSL.Context, SSL.Context]) -> None:
    server = TLSEngine(contexts[0], server_side=True)
    server.receive_data(b"\x16\x03\x01")
    server.receive_data(b"")
    with pytest.raises(errors.TLSHandshakeFailed) as caught:
        server.do_handshake()
    assert caught.value.reason == "eof"


def test_require_pq_checks_the_group_after_the_handshake(pki: DevPKI) -> None:
    # A context that still offers X25519 (not built by build_server_context with require_pq):
    # the engine's own check refuses the classical handshake and queues a close_notify.
    server_ctx = build_server_context(settings_for(pki))
    client_ctx = pyopenssl_client_context(pki.ca_cert, groups=("X25519",))
    server, client = _pair(server_ctx, client_ctx, require_pq=True)
    with pytest.raises(errors.TLSNotPostQuantum) as caught:
        _handshake(server, client)
    assert caught.value.code == "tls_pq_required" and "'X25519'" in caught.value.message
    assert server.info is None and server.failed
    _deliver(server, client)
    assert client.read(100) == b""  # the client saw an orderly close_notify


def test_groups_are_per_context(pki: DevPKI) -> None:
    classical_only = build_server_context(settings_for(pki, groups=("secp256r1",)))
    default = build_server_context(settings_for(pki))
    for server_ctx, want in ((classical_only, "secp256r1"), (default, "X25519MLKEM768")):
        server, client = _pair(server_ctx, pyopenssl_client_context(pki.ca_cert))
        _handshake(server, client)
        assert server.info is not None and server.info.group == want


def test_client_without_a_common_group_fails_with_no_shared_group(pki: DevPKI) -> None:
    server_ctx = build_server_context(settings_for(pki, groups=("X25519MLKEM768", "X25519")))
    server, client = _pair(server_ctx, pyopenssl_client_context(pki.ca_cert, groups=("secp384r1",)))
    with pytest.raises(errors.TLSHandshakeFailed) as caught:
        _handshake(server, client)
    assert caught.value.reason == "no_shared_group"
    assert not isinstance(caught.value, errors.TLSNotPostQuantum)


def test_sigalgs_helper_rejects_unknown_schemes() -> None:
    assert not _openssl.set_sigalgs(SSL.Context(SSL.TLS_METHOD), ("no-such-scheme",))
    # The refused call left nothing on OpenSSL's error queue for a later call to trip over.
    SSL.Context(SSL.TLS_METHOD).set_cipher_list(b"ECDHE+AESGCM")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(min_value=1, max_value=4000), max_size=12))
def test_any_chunking_of_the_wire_gives_the_same_result(
    contexts: tuple[SSL.Context, SSL.Context], cuts: list[int]
) -> None:
    """TCP may split the byte stream anywhere: feed the server arbitrary pieces."""
    server, client = _pair(*contexts)

    def feed_in_pieces(data: bytes) -> None:
        pos = 0
        for cut in cuts:
            if pos >= len(data):
                break
            server.receive_data(data[pos : pos + cut])
            pos += cut
            server.do_handshake()  # may or may not complete: must never fail on a partial record
        if pos < len(data):
            server.receive_data(data[pos:])

    client.do_handshake()
    feed_in_pieces(client.data_to_send())
    assert not server.do_handshake()
    _deliver(server, client)
    assert client.do_handshake()
    client.write(b"request body")
    feed_in_pieces(client.data_to_send())
    assert server.do_handshake()
    assert _read_all(server) == b"request body"
