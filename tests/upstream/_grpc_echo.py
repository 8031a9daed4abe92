"""A real gRPC server (grpcio, generic handlers, raw bytes: no protobuf) for the HTTP/2 upstream
tests, and the gRPC message framing (RFC-less but fixed: 1 byte compressed flag, 4 bytes
big-endian length, the message) spoken by hand on the client side."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc

SERVICE = "qpher.test.Echo"


def frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def unframe(data: bytes) -> list[bytes]:
    """Every whole message in ``data`` (a test reads whole bodies or whole messages)."""
    out = []
    while data:
        assert data[0] == 0, "compressed flag set"
        n = int.from_bytes(data[1:5], "big")
        assert len(data) >= 5 + n, "truncated message"
        out.append(data[5:5 + n])
        data = data[5 + n:]
    return out


@dataclass
class EchoServer:
    port: int
    server: grpc.Server
    metadata: list[dict[str, str]] = field(default_factory=list)  # invocation metadata per call


def _handlers(state: list[dict[str, str]]) -> grpc.GenericRpcHandler:
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        state.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        return b"echo:" + request

    def metadata(request: bytes, context: grpc.ServicerContext) -> bytes:
        return json.dumps([[k, v] for k, v in context.invocation_metadata() if isinstance(v, str)]).encode()

    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(float(request))
        return b"slept"

    def server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request)):
            yield b"part-%d" % i

    def big_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        count, size = (int(x) for x in request.split(b"x"))
        for i in range(count):
            yield bytes([i % 256]) * size

    def client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return b"+".join(requests)

    def bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for message in requests:
            yield b"echo:" + message

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "told to fail")
        raise AssertionError("unreachable")

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Metadata": grpc.unary_unary_rpc_method_handler(metadata),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "BigStream": grpc.unary_stream_rpc_method_handler(big_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Forbidden": grpc.unary_unary_rpc_method_handler(unary),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    })


@contextmanager
def echo_server(credentials: grpc.ServerCredentials | None = None) -> Iterator[EchoServer]:
    """The echo service on 127.0.0.1, insecure (h2c) or with ``credentials`` (h2 over TLS)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    state: list[dict[str, str]] = []
    server.add_generic_rpc_handlers((_handlers(state),))
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield EchoServer(port, server, state)
    finally:
        server.stop(None).wait()
