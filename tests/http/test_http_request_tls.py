"""``Request.tls``: what the connection's TLS handshake negotiated, None over plain TCP."""

from __future__ import annotations

from pathlib import Path

import trio
from _http_helpers import RawClient, get, make_pki, running_server, running_tls_server

from qpher_proxy.http import Request, Response
from qpher_proxy.tls.engine import TLSInfo


async def _tls_of(request: Request) -> Response:
    tls = request.tls
    assert tls is None or isinstance(tls, TLSInfo)
    return Response.json(200, {"version": tls.version if tls else None, "group": tls.group if tls else None})


async def test_a_request_over_tls_carries_the_negotiated_version_and_group(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "certs")
    async with running_tls_server(_tls_of, pki) as (_, port):
        client = await RawClient.connect_tls(port, pki.ca_cert)
        try:
            with trio.fail_after(10):
                for _ in range(2):  # the same on a reused connection
                    await client.send(get())
                    seen = (await client.read_response()).json()
                    assert seen["version"] == "TLSv1.3"
                    assert isinstance(seen["group"], str) and seen["group"]
        finally:
            await client.aclose()


async def test_a_request_over_plain_tcp_has_no_tls() -> None:
    async with running_server(_tls_of) as (_, port):
        client = await RawClient.connect(port)
        try:
            with trio.fail_after(10):
                await client.send(get())
                assert (await client.read_response()).json() == {"version": None, "group": None}
        finally:
            await client.aclose()
