"""Tickets across gateway processes: a connection whose ticket another process issued is
handed over (descriptor + bytes read) and resumes there. Here the two "processes" are two
holders and listeners in one trio run; the descriptor is duplicated as SCM_RIGHTS would."""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
from _tls_helpers import HTTP_RESPONSE, Outcome, pyopenssl_client_context, serve_tiny_http, settings_for
from test_tls_resumption import _info, visit

from qpher_proxy.tls import ServerTLSContextHolder, TLSInfo, TLSListener, TLSStream
from qpher_proxy.tls.certs import DevPKI
from qpher_proxy.tls.listener import HandOverListener


@dataclass
class Gateway:
    index: int
    holder: ServerTLSContextHolder
    port: int
    handover: HandOverListener
    outcomes: trio.MemoryReceiveChannel[Outcome]
    handed: list[int] = field(default_factory=list)

    async def next_outcome(self) -> Outcome:
        with trio.fail_after(10):
            return await self.outcomes.receive()


@asynccontextmanager
async def two_gateways(pki: DevPKI, *, hand_over: bool = True) -> AsyncIterator[tuple[Gateway, Gateway]]:
    gateways: list[Gateway] = []
    async with trio.open_nursery() as nursery:
        for index in range(2):
            holder = ServerTLSContextHolder(settings_for(pki))
            send, receive = trio.open_memory_channel[Outcome](math.inf)
            raw = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
            gw = Gateway(index, holder, raw.socket.getsockname()[1], HandOverListener(holder), receive)

            def on_handoff(target: int, fd: int, data: bytes, gw: Gateway = gw) -> bool:
                gw.handed.append(target)
                return hand_over and gateways[target].handover.deliver(os.dup(fd), data)

            listener = TLSListener(raw, holder, on_handoff=on_handoff)

            async def handler(stream: TLSStream, send: trio.MemorySendChannel[Outcome] = send) -> None:
                try:
                    try:
                        await stream.do_handshake()
                    except trio.BrokenResourceError as exc:
                        send.send_nowait(exc)
                        return
                    assert stream.info is not None
                    send.send_nowait(stream.info)
                    await serve_tiny_http(stream)
                except trio.BrokenResourceError:
                    pass
                finally:
                    await stream.aclose()

            await nursery.start(trio.serve_listeners, handler, [listener, gw.handover])
            gateways.append(gw)
        # What the supervisor would broadcast: each process learns the other's key names.
        for gw in gateways:
            other = gateways[1 - gw.index]
            gw.holder.peers.update({name: other.index for name in other.holder.current.accepted_key_names})
        try:
            yield gateways[0], gateways[1]
        finally:
            nursery.cancel_scope.cancel()


async def test_a_ticket_of_the_other_process_resumes_there(pki: DevPKI) -> None:
    ctx = pyopenssl_client_context(pki.ca_cert)
    async with two_gateways(pki) as (a, b):
        first = await trio.to_thread.run_sync(visit, b.port, ctx, None)  # B issues the ticket
        _info(await b.next_outcome())
        again = await trio.to_thread.run_sync(visit, a.port, ctx, first.session)  # lands on A
        handed = await a.next_outcome()
        resumed = _info(await b.next_outcome())
    assert a.handed == [1] and b.handover.delivered == 1
    assert again.reused and again.response == HTTP_RESPONSE
    assert resumed.resumed and resumed.group == "X25519MLKEM768"
    # A saw a "handed_off" end of its stream, which is not a failure it reports.
    assert isinstance(handed, trio.BrokenResourceError) and getattr(handed, "reason", None) == "handed_off"


async def test_a_declined_hand_over_is_a_full_handshake_where_it_landed(pki: DevPKI) -> None:
    ctx = pyopenssl_client_context(pki.ca_cert)
    async with two_gateways(pki, hand_over=False) as (a, b):
        first = await trio.to_thread.run_sync(visit, b.port, ctx, None)
        _info(await b.next_outcome())
        again = await trio.to_thread.run_sync(visit, a.port, ctx, first.session)
        info = _info(await a.next_outcome())
    assert a.handed == [1] and not again.reused and again.response == HTTP_RESPONSE
    assert isinstance(info, TLSInfo) and not info.resumed


async def test_own_tickets_are_never_handed_over(pki: DevPKI) -> None:
    ctx = pyopenssl_client_context(pki.ca_cert)
    async with two_gateways(pki) as (a, _b):
        first = await trio.to_thread.run_sync(visit, a.port, ctx, None)
        _info(await a.next_outcome())
        again = await trio.to_thread.run_sync(visit, a.port, ctx, first.session)
        assert _info(await a.next_outcome()).resumed
    assert again.reused and a.handed == []


async def test_a_handed_over_connection_is_never_handed_on(pki: DevPKI) -> None:
    """B does not know the ticket's key either (say it rotated it away meanwhile) but A's map
    still names B: B gives a full handshake, it does not send the connection back."""
    ctx = pyopenssl_client_context(pki.ca_cert)
    async with two_gateways(pki) as (a, b):
        first = await trio.to_thread.run_sync(visit, b.port, ctx, None)
        _info(await b.next_outcome())
        b.holder.reload()  # B forgets the key; A still maps its name to B
        b.holder.peers.update({name: 0 for name in a.holder.current.accepted_key_names})
        again = await trio.to_thread.run_sync(visit, a.port, ctx, first.session)
        await a.next_outcome()  # handed off
        info = _info(await b.next_outcome())
    assert not again.reused and not info.resumed and b.handed == []


async def test_hand_over_listener_closes_what_it_cannot_take(pki: DevPKI) -> None:
    import socket

    holder = ServerTLSContextHolder(settings_for(pki))
    listener = HandOverListener(holder, backlog=1)
    left, right = socket.socketpair()
    with left, right:
        assert listener.deliver(os.dup(left.fileno()), b"")
        spare = os.dup(left.fileno())
        assert not listener.deliver(spare, b"")  # full: closed at once
        try:
            os.fstat(spare)
            raise AssertionError("the refused descriptor is still open")
        except OSError:
            pass
        await listener.aclose()
    assert listener.delivered == 1 and listener.refused == 1
