"""``_h11_shortcuts``: every shortcut is live with the installed h11 and gives what h11's public
API gives. When h11 changes its internals, the first test fails and names the version."""

from __future__ import annotations

import h11
import pytest

from qpher_proxy.http import _h11_shortcuts

CHUNKED = b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_the_h11_shortcuts_are_live_with_the_installed_h11() -> None:
    assert _h11_shortcuts.LIVE == {
        "headers": True, "buffer": True, "chunks": True, "finish": True
    }, h11.__version__


def test_chunk_position_follows_a_chunked_body() -> None:
    h = h11.Connection(h11.SERVER)
    h.receive_data(CHUNKED)
    assert type(h.next_event()) is h11.Request
    assert _h11_shortcuts.body_is_chunked(h) is True
    assert _h11_shortcuts.chunk_position(h) == _h11_shortcuts.AT_CHUNK_SIZE_LINE
    h.receive_data(b"a\r\n0123")
    data = h.next_event()
    assert type(data) is h11.Data and data.data == b"0123"
    assert _h11_shortcuts.chunk_position(h) == 6
    assert bytes(_h11_shortcuts.receive_buffer(h)) == h.trailing_data[0] == b""
    h.receive_data(b"456789\r")
    h.next_event()
    assert _h11_shortcuts.chunk_position(h) == _h11_shortcuts.ELSEWHERE  # in the chunk's CRLF
    h.receive_data(b"\n0\r\n")
    assert h.next_event() is h11.NEED_DATA
    assert _h11_shortcuts.chunk_position(h) == _h11_shortcuts.ELSEWHERE  # in the trailer section
    h.receive_data(b"\r\n")
    assert type(h.next_event()) is h11.EndOfMessage


def test_a_body_with_content_length_is_not_chunked() -> None:
    h = h11.Connection(h11.SERVER)
    h.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nab")
    event = h.next_event()
    assert type(event) is h11.Request
    assert _h11_shortcuts.header_pairs(event.headers) == list(event.headers)
    assert _h11_shortcuts.body_is_chunked(h) is False
    assert _h11_shortcuts.chunk_position(h) == _h11_shortcuts.ELSEWHERE
    assert _h11_shortcuts.receive_buffer(h) == h.trailing_data[0] == b"ab"



def test_prebuilt_headers_serialise_as_the_public_api_does() -> None:
    items = [(b"content-type", b"content-type", b"application/json"), (b"x-a", b"x-a", b"1 2")]
    pairs = [(name, value) for name, _, value in items]
    ours, public = h11.Connection(h11.SERVER), h11.Connection(h11.SERVER)
    for h in (ours, public):
        h.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        h.next_event()
    head = ours.send(h11.Response(status_code=200, headers=_h11_shortcuts.Headers(items), reason=b"OK"))
    assert head == public.send(h11.Response(status_code=200, headers=pairs, reason=b"OK"))


def _exchange(head: bytes) -> h11.Connection:
    h = h11.Connection(h11.SERVER)
    h.receive_data(head)
    assert type(h.next_event()) is h11.Request
    while type(h.next_event()) is not h11.EndOfMessage:
        pass
    return h


def _public_send(h: h11.Connection, close: bool) -> None:
    headers = [(b"content-length", b"2")] + ([(b"connection", b"close")] if close else [])
    h.send(h11.Response(status_code=200, headers=headers))
    h.send(h11.Data(data=b"ok"))
    h.send(h11.EndOfMessage())


def _state(h: h11.Connection) -> tuple[object, ...]:
    return (h.our_state, h.their_state, h._cstate.keep_alive, h._writer, type(h._reader),
            h.they_are_waiting_for_100_continue)


NEXT = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "close"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),  # we close
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", True),  # the client closes
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", False),
        (b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc", False),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", False),
    ],
)
def test_finish_response_moves_h11_as_the_public_send_path_does(head: bytes, close: bool) -> None:
    ours, public = _exchange(head + NEXT), _exchange(head + NEXT)
    assert _h11_shortcuts.can_finish_response(ours)
    close = close or _h11_shortcuts.client_closes(ours)
    _h11_shortcuts.finish_response(ours, close)
    _public_send(public, close)
    assert _state(ours) == _state(public)
    if not close:  # the pipelined next request is parsed the same way by both
        ours.start_next_cycle()
        public.start_next_cycle()
        a, b = ours.next_event(), public.next_event()
        assert type(a) is type(b) is h11.Request and a.target == b.target == b"/next"


@pytest.mark.parametrize(
    "head",
    [
        b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n",  # no body may follow: h11's path
        b"GET / HTTP/1.0\r\n\r\n",  # an HTTP/1.0 client: h11 decides the framing
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",  # switch pending
    ],
)
def test_finish_response_is_refused_where_h11_must_write(head: bytes) -> None:
    assert not _h11_shortcuts.can_finish_response(_exchange(head))


def test_finish_response_is_refused_before_a_request() -> None:
    assert not _h11_shortcuts.can_finish_response(h11.Connection(h11.SERVER))


def test_switch_pending_only_after_a_complete_upgrade_request() -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert type(conn.next_event()) is h11.Request
    assert not _h11_shortcuts.switch_pending(conn)  # the (empty) body is still to be read
    assert type(conn.next_event()) is h11.EndOfMessage
    assert _h11_shortcuts.switch_pending(conn)
    conn.send(h11.InformationalResponse(status_code=101, headers=[("Upgrade", "websocket")]))
    assert conn.their_state is h11.SWITCHED_PROTOCOL and not _h11_shortcuts.switch_pending(conn)
    plain = h11.Connection(h11.SERVER)
    plain.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    plain.next_event(), plain.next_event()
    assert not _h11_shortcuts.switch_pending(plain)
