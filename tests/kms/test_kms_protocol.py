"""The sans-I/O KMS protocol: pairs of real connection objects, no sockets."""

from __future__ import annotations

import secrets
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_frames import encode_raw_request

from qpher_proxy.context import TenantContext
from qpher_proxy.kms.wire import protocol
from qpher_proxy.kms.wire.protocol import (
    NEED_DATA,
    ClientConnection,
    ConnectionClosed,
    Error,
    Hello,
    ProtocolError,
    Ready,
    RejectedRequest,
    Request,
    Response,
    ServerConnection,
    State,
    decode_value,
    encode_value,
)

TOKEN = secrets.token_bytes(32)
CTX = TenantContext("tenant-a", "req-1", "ak_1")


def serving_pair() -> tuple[ClientConnection, ServerConnection]:
    c = ClientConnection(TOKEN)
    s = ServerConnection()
    s.receive_data(c.hello({"dir": "/x", "n": 3}))
    hello = s.next_event()
    assert isinstance(hello, Hello) and hello.token == TOKEN and hello.config == {"dir": "/x", "n": 3}
    c.receive_data(s.ready({"pid": 42}))
    assert c.next_event() == Ready({"pid": 42})
    assert c.state is State.SERVING and s.state is State.SERVING
    return c, s


def drain(conn: ClientConnection | ServerConnection) -> list[object]:
    events = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return events
        events.append(ev)


ARGS = {"key_id": "k_" + "a" * 26, "message": b"\x00\xffbinary\n", "context": b"", "version": None, "n": -7,
        "f": 1.5, "ok": True, "no": False, "items": [{"op": "sign", "args": {"x": [1, 2, b"3"]}}], "s": "é✓"}


def test_request_and_response_round_trip_with_every_value_type() -> None:
    c, s = serving_pair()
    rid, frame = c.request(CTX, "sign", ARGS)
    s.receive_data(frame)
    (req,) = drain(s)
    assert isinstance(req, Request)
    assert (req.rid, req.token, req.context, req.op, req.args) == (rid, TOKEN, CTX, "sign", ARGS)
    c.receive_data(
        s.response(rid, {"signature": b"sig", "version": 1})
        + s.error(rid + 1, "key_not_found", 404, "no key 'k_x'")
    )
    assert drain(c) == [
        Response(rid, {"signature": b"sig", "version": 1}),
        Error(rid + 1, "key_not_found", 404, "no key 'k_x'"),
    ]


@pytest.mark.parametrize("chunking", ["whole", "one_byte_at_a_time", "odd_chunks"])
def test_many_frames_decode_however_the_bytes_arrive(chunking: str) -> None:
    c, s = serving_pair()
    frames = [c.request(CTX, f"op{i}", {"i": i, "blob": bytes([i]) * i})[1] for i in range(1, 40)]
    data = b"".join(frames)
    if chunking == "whole":
        chunks = [data]
    elif chunking == "one_byte_at_a_time":
        chunks = [data[i : i + 1] for i in range(len(data))]
    else:
        chunks = [data[i : i + 7] for i in range(0, len(data), 7)]
    events: list[object] = []
    for chunk in chunks:
        s.receive_data(chunk)
        events += drain(s)
    assert [e.op for e in events] == [f"op{i}" for i in range(1, 40)]  # type: ignore[attr-defined]
    assert [e.args["blob"] for e in events] == [bytes([i]) * i for i in range(1, 40)]  # type: ignore[attr-defined]


def test_the_receive_buffer_keeps_its_storage_and_frames_of_any_size_in_any_chunks_decode() -> None:
    """Large frames (batches) and small ones, fed in chunks that split headers and bodies, as
    memoryviews of one reused receive buffer (what both sides do): every frame decodes, and the
    storage is reused rather than given back between frames."""
    c, s = serving_pair()
    sizes = [10, 300_000, 5, 70_000, 1, 300_000, 64, 200_000]
    frames = [c.request(CTX, f"op{i}", {"blob": bytes([i]) * n})[1] for i, n in enumerate(sizes)]
    data = b"".join(frames)
    rbuf = bytearray(256 * 1024)
    events: list[object] = []
    pos = 0
    for i, step in enumerate([3, 9, 100_000, 1, 256 * 1024, 77_777] * 50):
        if pos >= len(data):
            break
        chunk = data[pos : pos + step]
        rbuf[: len(chunk)] = chunk
        s.receive_data(memoryview(rbuf)[: len(chunk)])
        pos += len(chunk)
        events += drain(s)
        if i == 4:
            storage = len(s._buf)
    assert [e.args["blob"] for e in events] == [bytes([i]) * n for i, n in enumerate(sizes)]  # type: ignore[attr-defined]
    assert s.buffered == 0
    assert len(s._buf) >= storage >= 300_000  # kept, not given back and regrown per frame
    # a frame far larger than what is kept between frames: afterwards the storage shrinks again
    big = c.request(CTX, "big", {"blob": b"x" * (protocol._KEEP_BUFFER + 10)})[1]
    s.receive_data(big)
    assert drain(s)[0].args["blob"] == b"x" * (protocol._KEEP_BUFFER + 10)  # type: ignore[attr-defined]
    s.receive_data(frames[0])
    assert len(drain(s)) == 1 and len(s._buf) <= protocol._KEEP_BUFFER


@pytest.mark.parametrize(
    "garbage", [b"\x00\x00\x00\x01", b"\xff\xff\xff\xffrest", b"\x00\x00\x00\x06\x09\x00\x00\x00\x01x"]
)
def test_trailing_garbage_after_valid_frames_is_a_protocol_error_after_them(garbage: bytes) -> None:
    c, s = serving_pair()
    _, frame = c.request(CTX, "ping", {})
    s.receive_data(frame + frame + garbage)
    assert isinstance(s.next_event(), Request)
    assert isinstance(s.next_event(), Request)
    with pytest.raises(ProtocolError):
        s.next_event()
    with pytest.raises(ProtocolError):  # and the connection stays dead
        s.next_event()
    assert s.state is State.CLOSED


def test_oversized_length_is_refused_as_soon_as_the_length_arrives() -> None:
    s = ServerConnection(max_frame_size=protocol.MIN_FRAME_SIZE)
    s.receive_data(struct.pack(">I", protocol.MIN_FRAME_SIZE + 1))  # four bytes, no body at all
    with pytest.raises(ProtocolError, match="exceeds the maximum"):
        s.next_event()


def test_sending_an_oversized_frame_is_refused_before_it_is_built() -> None:
    c = ClientConnection(TOKEN, max_frame_size=protocol.MIN_FRAME_SIZE)
    s = ServerConnection()
    s.receive_data(c.hello({}))
    s.next_event()
    c.receive_data(s.ready({}))
    c.next_event()
    with pytest.raises(ProtocolError, match="exceeds the maximum"):
        c.request(CTX, "encrypt", {"plaintext": b"x" * protocol.MIN_FRAME_SIZE})


def test_end_of_stream_in_the_middle_of_a_frame_is_a_protocol_error() -> None:
    c, s = serving_pair()
    _, frame = c.request(CTX, "ping", {})
    s.receive_data(frame[:-3])
    assert s.next_event() is NEED_DATA
    s.receive_data(b"")
    with pytest.raises(ProtocolError, match="middle of a frame"):
        s.next_event()


def test_end_of_stream_between_frames_is_a_clean_close() -> None:
    c, s = serving_pair()
    s.receive_data(b"")
    assert s.next_event() == ConnectionClosed()
    assert s.next_event() == ConnectionClosed()
    with pytest.raises(ProtocolError):
        s.receive_data(b"more")


def test_a_request_before_hello_is_a_protocol_error() -> None:
    s = ServerConnection()
    s.receive_data(encode_raw_request(1, TOKEN, "t", "r", "a", "ping", {}))
    with pytest.raises(ProtocolError, match="unexpected frame type REQUEST in state await_hello"):
        s.next_event()


def test_an_unknown_frame_type_is_a_protocol_error() -> None:
    c, s = serving_pair()
    s.receive_data(struct.pack(">IBI", 5, 77, 1))
    with pytest.raises(ProtocolError, match="unexpected frame type 77"):
        s.next_event()


@pytest.mark.parametrize(
    ("tenant", "request_id", "api_key_id", "code"),
    [("", "r", "a", "missing_tenant"), ("t", "", "a", "missing_context"), ("t", "r", "", "missing_context")],
)
def test_a_request_without_context_is_rejected_and_the_connection_continues(
    tenant: str, request_id: str, api_key_id: str, code: str
) -> None:
    c, s = serving_pair()
    s.receive_data(encode_raw_request(9, TOKEN, tenant, request_id, api_key_id, "ping", {}))
    (ev,) = drain(s)
    assert isinstance(ev, RejectedRequest) and ev.rid == 9 and ev.code == code
    _, frame = c.request(CTX, "ping", {})
    s.receive_data(frame)
    assert isinstance(s.next_event(), Request)


def test_undecodable_args_and_lying_counts_are_rejected_without_allocating() -> None:
    c, s = serving_pair()
    head = TOKEN + b"\x01t\x01r\x01a\x04ping"
    lying_list = bytes([7]) + struct.pack(">I", 2**31)  # a list claiming two billion items
    lying_bytes = bytes([5]) + struct.pack(">I", 2**31)
    for i, payload in enumerate(
        [head + lying_list, head + lying_bytes, head + b"\x63", head + b"\x08\x00\x00\x00\x01"], 1
    ):
        s.receive_data(struct.pack(">IBI", 5 + len(payload), 3, i) + payload)
        (ev,) = drain(s)
        assert isinstance(ev, RejectedRequest) and ev.rid == i and ev.code == "bad_request"
    assert s.state is State.SERVING


def test_a_request_cannot_exist_without_token_and_context() -> None:
    with pytest.raises(ValueError, match="service token"):
        Request(1, b"short", CTX, "ping", {})
    with pytest.raises(TypeError, match="TenantContext"):
        Request(1, TOKEN, ("t", "r", "a"), "ping", {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tenant_id"):
        Request(1, TOKEN, TenantContext("", "r", "a"), "ping", {})
    with pytest.raises(ValueError, match="service token"):
        ClientConnection(b"")
    c, _s = serving_pair()
    with pytest.raises(ValueError, match="request_id"):
        c.request(TenantContext("t", "", "a"), "ping", {})
    with pytest.raises(TypeError, match="TenantContext"):
        c.request(None, "ping", {})  # type: ignore[arg-type]


def test_token_and_payloads_never_appear_in_reprs() -> None:
    c, s = serving_pair()
    _, frame = c.request(CTX, "decrypt", {"ciphertext": b"SECRETPAYLOAD"})
    s.receive_data(frame)
    (req,) = drain(s)
    for obj in (req, Hello(TOKEN, {}), c, Response(1, b"SECRETPAYLOAD")):
        text = repr(obj)
        assert TOKEN.hex() not in text and repr(TOKEN) not in text and "SECRETPAYLOAD" not in text


def test_the_client_refuses_requests_before_ready_and_a_second_hello() -> None:
    c = ClientConnection(TOKEN)
    with pytest.raises(ProtocolError, match="await_ready"):
        c.request(CTX, "ping", {})
    c.hello({})
    with pytest.raises(ProtocolError, match="already sent"):
        c.hello({})


def test_a_fatal_bootstrap_error_reaches_the_client() -> None:
    c = ClientConnection(TOKEN)
    s = ServerConnection()
    s.receive_data(c.hello({}))
    s.next_event()
    c.receive_data(s.error(0, "kek_mismatch", 500, "the configured KEK is not the KEK of this key store"))
    assert c.next_event() == Error(
        0, "kek_mismatch", 500, "the configured KEK is not the KEK of this key store"
    )


def test_request_ids_wrap_within_range() -> None:
    c, _s = serving_pair()
    c._next_rid = protocol.MAX_RID
    assert c.request(CTX, "ping", {})[0] == protocol.MAX_RID
    assert c.request(CTX, "ping", {})[0] == 1


def test_values_nest_only_so_deep() -> None:
    v: object = 1
    for _ in range(protocol.MAX_DEPTH + 1):
        v = [v]
    with pytest.raises(ValueError, match="nest"):
        encode_value(v)  # type: ignore[arg-type]
    deep = b"\x07\x00\x00\x00\x01" * (protocol.MAX_DEPTH + 1) + b"\x00"
    with pytest.raises(ValueError, match="nest"):
        decode_value(deep)


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.binary(max_size=64)
    | st.text(max_size=20)
    | st.floats(allow_nan=False),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(values)
@settings(max_examples=200, deadline=None)
def test_value_codec_round_trips(v: object) -> None:
    assert decode_value(encode_value(v)) == v  # type: ignore[arg-type]


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_raise_anything_but_protocol_error(data: bytes) -> None:
    for conn in (ServerConnection(), serving_pair()[1], serving_pair()[0]):
        conn.receive_data(data)
        conn.receive_data(b"")
        try:
            for _ in range(50):
                ev = conn.next_event()
                assert ev is NEED_DATA or isinstance(
                    ev, (Hello, Request, RejectedRequest, Response, Error, Ready, ConnectionClosed)
                )
                if isinstance(ev, ConnectionClosed):
                    break
        except ProtocolError:
            pass
