"""A tiny HTTPS/1.1 server for the load generator's tests: one thread, non-blocking pyOpenSSL.

Routes (any method; a request body framed by Content-Length is read whole first):

    /ok        200, small JSON body, Content-Length
    /teapot    418, Content-Length
    /chunked   200, chunked body with a trailer
    /close     200 and ``Connection: close``, then the server closes the connection
    /echo      200, the body is the decimal length of the request body received
    /hang      nothing, ever (for the client's timeout)

It records, per completed handshake, the negotiated group (``handshakes``) and counts requests
(``requests``); both are read after ``stop()`` (which joins the thread).
"""

from __future__ import annotations

import selectors
import socket
import threading
from collections import Counter
from pathlib import Path

from OpenSSL import SSL

from qpher_proxy.tls import _openssl
from qpher_proxy.tls.certs import make_dev_pki
from qpher_proxy.tls.context import canonical_group_name

_OK_BODY = b'{"status":"ok"}'
RESPONSES = {
    b"/ok": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    % (len(_OK_BODY), _OK_BODY),
    b"/teapot": b"HTTP/1.1 418 I'm a teapot\r\ncontent-length: 6\r\n\r\nteapot",
    b"/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: yes\r\n\r\n",
    b"/close": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
}


class TinyTLSServer:
    def __init__(self, directory: Path, groups: tuple[str, ...] = ("X25519MLKEM768", "X25519")) -> None:
        pki = make_dev_pki(directory / "certs", mldsa=False)
        self.ca_file = str(pki.ca_cert)
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_TICKET)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        assert _openssl.set_groups(ctx, groups)
        ctx.use_certificate_chain_file(str(pki.server_cert))
        ctx.use_privatekey_file(str(pki.server_key))
        self._ctx = ctx
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(512)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self.handshakes: Counter[str] = Counter()
        self.requests = 0
        self._thread = threading.Thread(target=self._serve, name="tiny-tls-server", daemon=True)

    def __enter__(self) -> TinyTLSServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._wake_w.send(b"x")
            self._thread.join(10)
        self._wake_w.close()
        self._wake_r.close()
        self._listener.close()

    # -- the loop (server thread) --

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        conns: dict[socket.socket, list[object]] = {}  # sock -> [tls, buffer, handshaken]
        try:
            while True:
                for key, _ in sel.select():
                    sock = key.fileobj
                    if sock is self._wake_r:
                        return
                    if sock is self._listener:
                        self._accept(sel, conns)
                    else:
                        self._readable(sel, conns, sock)  # type: ignore[arg-type]
        finally:
            for s in list(conns):
                s.close()
            sel.close()

    def _accept(self, sel: selectors.BaseSelector, conns: dict[socket.socket, list[object]]) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            tls = SSL.Connection(self._ctx, sock)
            tls.set_accept_state()
            conns[sock] = [tls, b"", False]
            sel.register(sock, selectors.EVENT_READ, None)

    def _drop(
        self, sel: selectors.BaseSelector, conns: dict[socket.socket, list[object]], sock: socket.socket
    ) -> None:
        sel.unregister(sock)
        del conns[sock]
        sock.close()

    def _readable(self, sel: selectors.BaseSelector, conns: dict[socket.socket, list[object]],
                  sock: socket.socket) -> None:
        state = conns[sock]
        tls: SSL.Connection = state[0]  # type: ignore[assignment]
        try:
            if not state[2]:
                tls.do_handshake()
                state[2] = True
                self.handshakes[canonical_group_name(tls.get_group_name() or "?")] += 1
            data = tls.recv(65536)
        except SSL.WantReadError:
            return
        except (SSL.Error, OSError):
            self._drop(sel, conns, sock)
            return
        buf = state[1] + data  # type: ignore[operator]
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end]
            lower = head.lower()
            i = lower.find(b"\r\ncontent-length:")
            length = int(lower[i + 17 :].split(b"\r\n", 1)[0]) if i >= 0 else 0
            if len(buf) < end + 4 + length:
                break
            path = head.split(b" ", 2)[1]
            buf = buf[end + 4 + length :]
            self.requests += 1
            if path == b"/hang":
                continue
            if path == b"/echo":
                body = b"%d" % length
                response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            else:
                response = RESPONSES.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            try:
                tls.sendall(response)
            except (SSL.Error, OSError):
                self._drop(sel, conns, sock)
                return
            if path == b"/close":
                self._drop(sel, conns, sock)
                return
        state[1] = buf
