"""``POST /v1/sign/batch`` items per second over real TLS, beside the raw library's single-core rate.

    python -m qpher_proxy_bench.batch_bench --backend liboqs --seconds 3 --concurrency 1,2,4

Two functions for ``gateway_bench`` (or anyone holding a running gateway):

* :func:`batch_rate` drives ``POST /v1/sign/batch`` with ``items`` ML-DSA-65 signatures of a
  1 KiB message per request, over keep-alive TLS (X25519MLKEM768, certificate verified) with
  :mod:`.loadgen`'s client, one pre-built request (``build_request``) sent again and again, and
  returns requests/s and items/s (plus latency, errors and, given the server's pids, the server's
  CPU per item). The request is checked once before the load: 200 and every item ``ok``.
* :func:`raw_sign_rate`: the library's own ML-DSA-65 signatures per CPU second in this process
  (``crypto_bench``'s raw calls: liboqs-python's ``sign_with_ctx_str`` or cryptography's
  ``sign``), single core, the same 1 KiB message. ``items/s / raw`` is the batch's efficiency.

``main`` starts a throwaway gateway (``gateway_bench.GatewayProcess``) and prints both.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from typing import Any

from .loadgen import ClientTLS, CPUWatch, LoadGenerator, LoadSpec, build_request, probe

PAYLOAD = bytes(range(256)) * 4  # 1 KiB, as gateway_bench's API suite
GROUP = "X25519MLKEM768"


class BatchBenchError(RuntimeError):
    """The batch request failed before the load (the message says how)."""


def batch_request(api_key: str, key_id: str, items: int = 64, message: bytes = PAYLOAD) -> bytes:
    """The whole ``POST /v1/sign/batch`` request: ``items`` signatures of ``message`` by ``key_id``."""
    if items < 1:
        raise ValueError(f"items: expected >= 1, got {items!r}")
    msg = base64.b64encode(message).decode("ascii")
    body = json.dumps({"items": [{"key_id": key_id, "message": msg}] * items}, separators=(",", ":")).encode()
    headers = {"Authorization": f"Bearer {api_key}", "User-Agent": "qpher-bench",
               "Content-Type": "application/json"}
    return build_request("POST", "/v1/sign/batch", headers=headers, body=body)


def check_batch(port: int, cafile: str | None, request: bytes, items: int) -> None:
    """One request before the load: 200, and ``items`` items, every one ``ok``."""
    r = probe(port, ClientTLS(GROUP, cafile=cafile), request=request, timeout=30.0)
    if not r.ok:
        raise BatchBenchError(f"POST /v1/sign/batch: {r.error}")
    try:
        doc = json.loads(r.body)
    except ValueError:
        doc = None
    if r.status != 200:
        err = doc.get("error") if isinstance(doc, dict) else None
        raise BatchBenchError(f"POST /v1/sign/batch: status {r.status}: {err!r:.200}")
    got = doc.get("items") if isinstance(doc, dict) else None
    if not isinstance(got, list) or len(got) != items:
        raise BatchBenchError(f"POST /v1/sign/batch answered {len(got) if isinstance(got, list) else 'no'} "
                              f"items for {items}")
    bad = [i for i, it in enumerate(got) if not (isinstance(it, dict) and it.get("ok") is True)]
    if bad:
        raise BatchBenchError(f"POST /v1/sign/batch: item {bad[0]} failed: {got[bad[0]]!r:.200}")


def batch_rate(
    port: int,
    cafile: str | None,
    api_key: str,
    key_id: str,
    items: int = 64,
    seconds: float = 3.0,
    concurrency: int = 1,
    *,
    warmup: float = 0.5,
    lg: LoadGenerator | None = None,
    server_pids: list[int] | None = None,
    message: bytes = PAYLOAD,
) -> dict[str, Any]:
    """Items/s of ``POST /v1/sign/batch`` (``items`` per request, ``concurrency`` keep-alive
    connections) against the gateway on 127.0.0.1:``port``.

    ``lg``: a started :class:`LoadGenerator` to reuse (else one client process for this run).
    ``server_pids``: the gateway's process tree (``GatewayProcess.pids()``), to report the
    server's CPU per item. Raises :class:`BatchBenchError` if the request does not succeed."""
    request = batch_request(api_key, key_id, items, message)
    check_batch(port, cafile, request, items)
    spec = LoadSpec.keepalive(port, ClientTLS(GROUP, cafile=cafile), request, connections=concurrency,
                              seconds=seconds, warmup=warmup)
    watch = CPUWatch(server_pids) if server_pids else None
    if lg is None:
        with LoadGenerator(1) as own:
            res = own.run(spec, on_window=watch)
    else:
        res = lg.run(spec, on_window=watch)
    out: dict[str, Any] = {
        "items": items,
        "concurrency": concurrency,
        "requests": res.ok,
        "requests_per_s": round(res.rate, 2),
        "items_per_s": round(res.rate * items, 1),
        "p50_ms": round(res.p50_ms, 3) if res.ok else None,
        "p99_ms": round(res.p99_ms, 3) if res.ok else None,
        "errors": dict(res.errors),
        "client_cpu_s": round(res.client_cpu_s, 3),
    }
    if watch is not None and res.ok:
        out["server_cores"] = round(watch.cores, 3)
        out["server_us_per_item"] = round(watch.cpu / (res.ok * items) * 1e6, 1)
    return out


def raw_sign_rate(backend: str, seconds: float = 2.0) -> float:
    """The library's own ML-DSA-65 signatures of the 1 KiB payload per CPU second, single core, in
    this process (``backend``: ``liboqs`` or ``openssl``; ``auto`` picks as the gateway would)."""
    from .crypto_bench import raw_table
    from .gateway_bench import _ops_per_cpu_second

    key, table = raw_table(backend, "ml-dsa-65")
    rate = _ops_per_cpu_second(table["sign"], seconds)
    del key  # only now: the raw call uses liboqs objects the key frees
    return rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qpher-proxy bench batch", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="liboqs", choices=["auto", "openssl", "liboqs"])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--items", type=int, default=64)
    p.add_argument("--concurrency", default="1,2", help="comma-separated (default 1,2)")
    p.add_argument("--quick", action="store_true", help="1 s per run")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds = 1.0
    from .gateway_bench import GatewayProcess

    raw = raw_sign_rate(args.backend, min(args.seconds, 2.0))
    rows = []
    with GatewayProcess(backend=args.backend) as gw:
        status, doc = gw.call("POST", "/v1/keys", {"algorithm": "ml-dsa-65", "label": "bench-batch"})
        if status != 201:
            raise BatchBenchError(f"POST /v1/keys: status {status}: {doc!r:.200}")
        with LoadGenerator(1) as lg:
            for conc in (int(c) for c in args.concurrency.split(",")):
                r = batch_rate(gw.port, gw.ca_file, gw.api_key, doc["key_id"], args.items, args.seconds, conc,
                               lg=lg, server_pids=gw.pids())
                r["raw_sign_per_s"] = round(raw, 1)
                r["vs_raw"] = round(r["items_per_s"] / raw, 3) if raw else None
                rows.append(r)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"POST /v1/sign/batch, {args.items} x ML-DSA-65 of 1 KiB, backend {args.backend}; "
          f"raw single-core sign {raw:.0f}/s")
    print(f"{'conc':>4} {'req/s':>8} {'items/s':>9} {'/raw':>6} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'srv cores':>9} {'srv us/item':>11} errors")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['requests_per_s']:8.1f} {r['items_per_s']:9.0f} {r['vs_raw']:6.3f} "
              f"{r['p50_ms'] or 0:8.2f} {r['p99_ms'] or 0:8.2f} {r.get('server_cores', 0):9.2f} "
              f"{r.get('server_us_per_item', 0):11.1f} {r['errors'] or 0}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
