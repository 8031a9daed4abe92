"""``bind_listeners``: the supervisor's listening sockets for ``server.workers`` gateways."""

from __future__ import annotations

import socket

import pytest

from qpher_proxy.errors import ConfigError
from qpher_proxy.server.privsep import bind_listeners


def _close(groups: list[list[socket.socket]]) -> None:
    for group in groups:
        for s in group:
            s.close()


def test_copies_share_the_port_the_kernel_picked_with_so_reuseport() -> None:
    groups = bind_listeners(["127.0.0.1:0"], 3)
    try:
        assert [len(g) for g in groups] == [1, 1, 1]
        ports = {g[0].getsockname()[1] for g in groups}
        assert len(ports) == 1 and ports != {0}
        for [s] in groups:
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        # a connection is accepted by one of them
        with socket.create_connection(("127.0.0.1", ports.pop()), timeout=5):
            pass
    finally:
        _close(groups)


def test_one_copy_does_not_set_so_reuseport() -> None:
    [[s]] = bind_listeners(["127.0.0.1:0"], 1)
    try:
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    finally:
        s.close()


def test_a_port_in_use_is_a_one_line_error_and_nothing_stays_bound() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            free = other.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"server.listen: cannot listen on 127.0.0.1:{port}: "):
            bind_listeners([f"127.0.0.1:{free}", f"127.0.0.1:{port}"], 2)
    # the first address's sockets were closed again: it can be bound at once without SO_REUSEPORT
    with socket.socket() as again:
        again.bind(("127.0.0.1", free))
