"""The example app behind the sidecar: it answers every request with what it received.

Standard library only, so any image with Python 3 runs it (the compose example uses the proxy's own
image). It listens on 127.0.0.1 only: nothing outside its network namespace can reach it, so every
request it sees came through the proxy, which shares that namespace (``network_mode: service:app``
in compose, the pod's network in Kubernetes). Each answer is JSON:

    {"method": "GET", "path": "/hello?x=1", "headers": [["Host", "..."], ...],
     "body_bytes": 0, "seen": 3}

``seen`` counts the requests this process has answered, this one included, so a client can tell that
a request the proxy refused never got here. PORT (default 8080) picks the port.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_lock = threading.Lock()
_seen = 0


class EchoHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 with Content-Length on every answer: the proxy keeps its upstream connections open.
    protocol_version = "HTTP/1.1"
    server_version = "qpher-sidecar-example-app"

    def _body_length(self) -> int:
        """Read (and discard) the request body, plain or chunked; return its length."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return total
                total += len(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return len(self.rfile.read(length)) if length > 0 else 0

    def _answer(self) -> None:
        global _seen
        body_bytes = self._body_length()
        with _lock:
            _seen += 1
            seen = _seen
        payload = json.dumps({
            "method": self.command,
            "path": self.path,
            "headers": [[name, value] for name, value in self.headers.items()],
            "body_bytes": body_bytes,
            "seen": seen,
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _answer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        # One line per request on stderr (`docker-compose logs app`); never the headers, which may
        # carry credentials in an app that does not sit behind the proxy.
        sys.stderr.write(f"app: {self.address_string()} {format % args}\n")


def main() -> None:
    port = int(os.environ.get("PORT", "8080"))
    server = ThreadingHTTPServer(("127.0.0.1", port), EchoHandler)
    server.daemon_threads = True
    print(f"app: listening on http://127.0.0.1:{port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    # SIGTERM (docker stop) ends the process at once: the app keeps no state worth draining.
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    main()
