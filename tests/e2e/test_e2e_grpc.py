"""gRPC through the real gateway: a grpcio client over TLS (ALPN h2) to ``qpher-proxy serve`` in
sidecar mode with ``upstream.protocol: h2c``, in front of a grpcio server (generic handlers, raw
bytes). Unary and streaming calls pass with their trailers; a policy deny on one method path is
PERMISSION_DENIED for that method only; no key is UNAUTHENTICATED; the upstream sees the proxy's
identity metadata and never the API key."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest

from ._gateway import Gateway, init_state, start_gateway

SERVICE = "qpher.test.Echo"

DENY_FORBIDDEN = f"""\
version: 1
rules:
  - id: forbidden-method
    effect: deny
    match: {{path: /{SERVICE}/Forbidden}}
    reason: this method is not exposed
"""


@dataclass
class Upstream:
    port: int
    metadata: list[dict[str, str]] = field(default_factory=list)  # each call's invocation metadata
    ended: threading.Event = field(default_factory=threading.Event)  # a Watch call's RPC ended


def _handler(up: Upstream) -> grpc.GenericRpcHandler:
    def seen(context: grpc.ServicerContext) -> None:
        up.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen(context)
        return b"echo:" + request

    def server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request)):
            yield b"part-%d" % i

    def client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return b"+".join(requests)

    def bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        seen(context)
        for message in requests:
            yield b"echo:" + message

    def watch(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        context.add_callback(up.ended.set)
        for message in requests:
            yield b"echo:" + message

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "told to fail")
        raise AssertionError("unreachable")

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Forbidden": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Watch": grpc.stream_stream_rpc_method_handler(watch),
    })


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    port = server.add_insecure_port("127.0.0.1:0")
    up = Upstream(port)
    server.add_generic_rpc_handlers((_handler(up),))
    server.start()
    yield up
    server.stop(None).wait()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Gateway]:
    d = tmp_path_factory.mktemp("grpcgw")
    init_state(d, **{"crypto.backend": "openssl", "upstream.url": f"http://127.0.0.1:{upstream.port}",
                     "upstream.protocol": "h2c"})
    (d / "policies" / "15-forbidden.yaml").write_text(DENY_FORBIDDEN)
    gateway = start_gateway(d)
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def channel(gw: Gateway) -> Iterator[grpc.Channel]:
    creds = grpc.ssl_channel_credentials(root_certificates=gw.ca_file.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{gw.port}", creds,
                             options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        yield ch


def auth(gw: Gateway) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {gw.demo_key}")]


def test_unary_call_passes_and_the_upstream_sees_identity_but_no_key(
        gw: Gateway, channel: grpc.Channel, upstream: Upstream) -> None:
    call = channel.unary_unary(f"/{SERVICE}/Unary")
    before = len(upstream.metadata)
    assert call(b"hello", metadata=auth(gw), timeout=10) == b"echo:hello"
    seen = upstream.metadata[before]
    assert seen["x-qpher-tenant"] and seen["x-qpher-key-id"] and seen["x-request-id"]
    assert gw.demo_key.startswith(f"qph_{seen['x-qpher-key-id']}_")
    assert "authorization" not in seen and "x-api-key" not in seen
    assert not any(gw.demo_key in v for v in seen.values())


def test_bidi_streaming_call_answers_each_message_while_the_call_is_open(
        gw: Gateway, channel: grpc.Channel) -> None:
    outbox: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[bytes]:
        while (message := outbox.get(timeout=10)) is not None:
            yield message

    call = channel.stream_stream(f"/{SERVICE}/Bidi")
    responses = call(requests(), metadata=auth(gw), timeout=10)
    answers = []
    for word in (b"one", b"two", b"three"):
        outbox.put(word)
        answers.append(next(responses))  # answered before the next request is even written
    outbox.put(None)
    assert answers == [b"echo:one", b"echo:two", b"echo:three"]
    assert list(responses) == []
    assert responses.code() == grpc.StatusCode.OK


def test_server_and_client_streaming_calls_pass(gw: Gateway, channel: grpc.Channel) -> None:
    parts = list(channel.unary_stream(f"/{SERVICE}/ServerStream")(b"3", metadata=auth(gw), timeout=10))
    assert parts == [b"part-0", b"part-1", b"part-2"]
    client_stream = channel.stream_unary(f"/{SERVICE}/ClientStream")
    joined = client_stream(iter([b"a", b"b"]), metadata=auth(gw), timeout=10)
    assert joined == b"a+b"


def test_policy_deny_on_one_method_is_permission_denied_for_that_method_only(
        gw: Gateway, channel: grpc.Channel, upstream: Upstream) -> None:
    before = len(upstream.metadata)
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(f"/{SERVICE}/Forbidden")(b"x", metadata=auth(gw), timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert len(upstream.metadata) == before  # never reached the upstream
    assert channel.unary_unary(f"/{SERVICE}/Unary")(b"still", metadata=auth(gw), timeout=10) == b"echo:still"


def test_missing_key_is_unauthenticated(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_an_upstream_error_status_and_message_pass_through(gw: Gateway, channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(f"/{SERVICE}/Fail")(b"x", metadata=auth(gw), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == "told to fail"


def test_concurrent_calls_on_one_channel(gw: Gateway, channel: grpc.Channel) -> None:
    call = channel.unary_unary(f"/{SERVICE}/Unary")
    results: dict[int, bytes] = {}

    def one(i: int) -> None:
        results[i] = call(b"%d" % i, metadata=auth(gw), timeout=10)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: b"echo:%d" % i for i in range(20)}


def test_a_call_the_client_cancels_ends_at_the_upstream(
        gw: Gateway, channel: grpc.Channel, upstream: Upstream) -> None:
    outbox: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[bytes]:
        while (message := outbox.get(timeout=10)) is not None:
            yield message

    responses = channel.stream_stream(f"/{SERVICE}/Watch")(requests(), metadata=auth(gw), timeout=10)
    outbox.put(b"one")
    assert next(responses) == b"echo:one"
    assert not upstream.ended.is_set()
    responses.cancel()  # RST_STREAM(CANCEL) to the proxy, which resets its upstream stream
    assert upstream.ended.wait(5)
    outbox.put(None)


def test_a_websocket_upgrade_with_an_h2_upstream_is_501_websocket_unsupported(
        gw: Gateway, upstream: Upstream) -> None:
    """WebSocket passthrough is HTTP/1.1 to the upstream; an h2c upstream cannot take one."""
    import base64
    import json
    import os
    import socket

    with socket.create_connection((gw.host, gw.port)) as raw, \
            gw.context().wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(
            b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + base64.b64encode(os.urandom(16))
            + b"\r\nAuthorization: Bearer " + gw.demo_key.encode() + b"\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = tls.recv(4096)
            assert chunk, answer
            answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(body) < length:
            body += tls.recv(4096)
    assert head.startswith(b"HTTP/1.1 501 ")
    assert json.loads(body)["error"]["code"] == "websocket_unsupported"
