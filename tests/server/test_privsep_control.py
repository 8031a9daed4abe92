"""The supervisor <-> gateway control socket: one JSON message per datagram, at most one
descriptor each; whatever is malformed is dropped and its descriptors closed."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from qpher_proxy.kms.launcher import KMSSupervisor
from qpher_proxy.kms.wire.model import KEKSettings
from qpher_proxy.kms.wire.protocol import ClientConnection, State
from qpher_proxy.server.privsep import receive_message, send_message


def _pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return trio.socket.from_stdlib_socket(a), trio.socket.from_stdlib_socket(b)


async def test_a_message_carries_one_descriptor_that_refers_to_the_same_file() -> None:
    a, b = _pair()
    r, w = os.pipe()
    with a, b:
        await send_message(a, {"t": "worker", "index": 1}, w)
        got = await receive_message(b)
        assert got is not None
        msg, fd = got
        assert msg == {"t": "worker", "index": 1} and fd is not None and fd != w
        os.write(fd, b"x")
        assert os.read(r, 1) == b"x"
        for x in (r, w, fd):
            os.close(x)


async def test_a_malformed_message_is_refused_and_its_descriptor_closed() -> None:
    a, b = _pair()
    r, w = os.pipe()
    with a, b:
        await a.sendmsg([b"not json"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, w.to_bytes(4, "little"))])
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(ValueError, match="malformed control message"):
            await receive_message(b)
        assert set(os.listdir("/proc/self/fd")) <= before | {str(x) for x in (r, w)}
        await send_message(a, {"no": "type"})
        with pytest.raises(ValueError):
            await receive_message(b)
        a.close()
        assert await receive_message(b) is None  # EOF
    os.close(r)
    os.close(w)


async def test_oversized_messages_are_not_sent() -> None:
    a, b = _pair()
    with a, b, pytest.raises(ValueError, match="too large"):
        await send_message(a, {"t": "x", "pad": "y" * 70_000})


def test_a_handed_over_connection_starts_serving_with_the_hello_token() -> None:
    conn = ClientConnection.bootstrapped(b"t" * 32)
    assert conn.state is State.SERVING
    with pytest.raises(Exception, match="HELLO already sent"):
        conn.hello({})


def test_the_supervisor_kills_only_its_own_workers(tmp_path: object) -> None:
    sup = KMSSupervisor(kms_dir=str(tmp_path), kek=KEKSettings(provider="file", file="x", env="QPHER_KEK"))
    assert sup.kill(os.getpid()) is False  # the gateway may ask; anything but a live worker is refused
    assert sup.kill(1) is False
