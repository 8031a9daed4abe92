"""``server.workers: 2`` on real processes: a TLS 1.3 ticket resumes whichever gateway process
the kernel hands the reconnection to (the other one hands the connection over through the
supervisor, tls/context.py and server/privsep.py)."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest
from _tls_helpers import pyopenssl_client_context
from test_tls_resumption import visit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from e2e._gateway import init_state, start_gateway  # noqa: E402


@pytest.mark.slow
def test_every_reconnection_resumes_with_two_gateway_processes(tmp_path: Path) -> None:
    d = tmp_path / "state"
    init_state(d, **{"crypto.backend": "openssl", "server.workers": 2, "server.listen": ["127.0.0.1:0"]})
    gw = start_gateway(d)
    try:
        deadline = time.monotonic() + 30
        while sum(1 for r in gw.read_logs() if r.get("msg") == "serving") < 2:
            assert time.monotonic() < deadline, "the second gateway did not start"
            time.sleep(0.05)
        ctx = pyopenssl_client_context(Path(gw.ca_file))
        session = visit(gw.port, ctx).session
        # The key names travel through the supervisor once both processes are up: wait until a
        # reconnection resumes, then every one must, wherever the kernel sends it.
        deadline = time.monotonic() + 30
        while True:
            got = visit(gw.port, ctx, session)
            session = got.session
            if got.reused:
                break
            assert time.monotonic() < deadline, "no reconnection ever resumed"
            time.sleep(0.1)
        reused = []
        for _ in range(16):
            got = visit(gw.port, ctx, session)
            reused.append(got.reused)
            assert got.group == "X25519MLKEM768" and got.response.startswith(b"HTTP/1.1 ")
            session = got.session
        assert all(reused), reused
    finally:
        gw.stop(signal.SIGTERM)
