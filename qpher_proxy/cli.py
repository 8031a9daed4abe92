"""The ``qpher-proxy`` command line.

Every sub-command imports what it needs lazily, so that ``qpher-proxy version`` does not load
trio, and the gateway-side commands never import the KMS-only modules (the KMS runs as its own
process; ``kms rotate-kek`` is the one admin command that loads them, on purpose, offline).

A :class:`~qpher_proxy.errors.QpherError` (a config mistake, a bad argument) prints one line to
stderr and exits 2 (config) or 1; never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeAlias

from .errors import ConfigError, QpherError

DEFAULT_STATE_DIR = ".qpher"

_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

# `qpher-proxy bench NAME`: each runs a module of the qpher_proxy_bench package (see _bench).
BENCHMARKS = {
    "crypto": "every algorithm and backend next to the raw library",
    "kms": "sign and decapsulate through the KMS socketpair next to in-process",
    "policy": "policy evaluation cost for chains of 10 to 1,000 rules",
    "auth": "API-key authentication and the other pre-policy steps",
    "tls": "full TLS 1.3 handshakes per second per key-exchange group",
    "http": "keep-alive HTTP/1.1 requests per second over plain TCP",
    "gateway": "the whole gateway over TLS, and nginx beside it when installed",
    "scaleout": "sign/encapsulate on SQLite vs PostgreSQL + Redis vs 2 processes; cross-node rate limit",
    "shared-limiter": "rate-limit checks: per-process buckets vs the host-wide shared table",
    "kms-tier": "sign/encapsulate: local KMS socketpair vs a remote KMS node over PQ mTLS; its handshakes/s",
    "audit": "transparent audit log: per-record tree overhead, proofs and checkpoint signing at 10^6 records",
    "h2": "HTTP/2 vs HTTP/1.1 keep-alive (h2load) for /healthz and sign, same run; CPU per stream",
    "grpc": "gRPC unary p50/p99 through the sidecar (h2 to an h2c upstream) vs direct, same run",
}


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        default=os.environ.get("QPHER_CONFIG", f"{DEFAULT_STATE_DIR}/config.yaml"),
        help="config file (default: $QPHER_CONFIG or .qpher/config.yaml)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qpher-proxy", description="Post-quantum crypto gateway")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_init(sub)
    _add_serve(sub)
    _add_version(sub)
    _add_check_config(sub)
    _add_healthcheck(sub)
    _add_apikey(sub)
    _add_policy(sub)
    _add_audit(sub)
    _add_kms(sub)
    _add_db(sub)
    _add_fail_open(sub)
    _add_bench(sub)
    return parser


def _add_version(sub: _Commands) -> None:
    """``version``."""
    p = sub.add_parser("version", help="print versions of the product, its backend and libraries")
    p.add_argument("--json", action="store_true",
                   help="print the facts a container image records as labels, as one JSON object")
    p.add_argument("--expect", action="append", default=[], metavar="NAME=VALUE",
                   help="exit 1 unless NAME (qpher-proxy, cryptography, openssl, liboqs) has VALUE "
                        "(an image build checks its labels with it)")


def _add_healthcheck(sub: _Commands) -> None:
    """``healthcheck``."""
    p = sub.add_parser("healthcheck",
                       help="exit 0 if this config's gateway answers /healthz (container probes)")
    _add_config(p)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds for connect, handshake and answer")


def _add_init(sub: _Commands) -> None:
    """``init``."""
    p = sub.add_parser("init", help="create a working dev state (PKI, KEK, pepper, config, demo API key)")
    p.add_argument("--dir", default=DEFAULT_STATE_DIR, help="state directory (default: .qpher)")
    p.add_argument("--port", type=int, default=8443, help="port written to the new config (default 8443)")
    p.add_argument("--listen", default=None, metavar="HOST:PORT",
                   help="address written to the new config (default 127.0.0.1:PORT; a container's "
                        "entrypoint passes 0.0.0.0:8443)")
    p.add_argument("--mldsa-cert", action="store_true", help="also make an ML-DSA-65 server certificate")
    p.add_argument("--renew-certs", action="store_true",
                   help="issue new server certificates from the dev CA (kept in DIR/ca/) even if still valid")
    g = p.add_argument_group(
        "internal PKI", "With --internal-pki, init makes only the PKI of the gateway <-> KMS hop (ML-DSA-65 "
                        "and ECDSA P-256 CAs, gateway and KMS certificates) and prints the config sections "
                        "that use it; --dir and the dev state are left alone.")
    g.add_argument("--internal-pki", metavar="DIR", default=None,
                   help="write the internal CA and the gateway/KMS certificate pairs into DIR")
    g.add_argument("--trust-domain", default="qpher.internal",
                   help="the SPIFFE trust domain of the role URIs (default qpher.internal)")
    g.add_argument("--kms-host", action="append", default=None, dest="kms_hosts", metavar="HOST",
                   help="a DNS name or IP address for the KMS certificate; repeat for several "
                        "(default: localhost and 127.0.0.1)")
    g.add_argument("--kms-listen", default="127.0.0.1:9443", metavar="HOST:PORT",
                   help="the KMS node address written into the printed config (default 127.0.0.1:9443)")
    g.add_argument("--force", action="store_true", help="replace an existing internal PKI in DIR")


def _add_serve(sub: _Commands) -> None:
    """``serve``."""
    p = sub.add_parser("serve", help="run the gateway and its KMS workers")
    _add_config(p)
    p.add_argument("--kek-fd", type=int, default=None, help=argparse.SUPPRESS)  # set by serve's own re-exec


def _add_check_config(sub: _Commands) -> None:
    """``check-config``."""
    p = sub.add_parser("check-config", help="validate a config file and exit",
                       description="Validate a config file as `serve` would load it, and exit: 0 and one "
                                   "line if it is valid, 2 and one line naming the mistake if not.")
    _add_config(p)
    p.add_argument("--no-files", action="store_true",
                   help="do not check that the files it names exist (certificates, policy directory): "
                        "validate a config written for another machine, or config.example.yaml")


def _add_apikey(sub: _Commands) -> None:
    """``apikey create|list|revoke``."""
    p = sub.add_parser("apikey", help="manage API keys")
    asub = p.add_subparsers(dest="apikey_command", required=True, metavar="ACTION")
    c = asub.add_parser("create", help="create a key; it is printed exactly once",
                        description="Create an API key and print it once on stdout (its id, tenant, plan "
                                    "and scopes go to stderr). The plan must be one the configured policy "
                                    "declares; each scope must be admin, metrics, audit or one the policy's "
                                    "rules name.")
    _add_config(c)
    c.add_argument(
        "--tenant", required=True, help="the tenant the key acts for (clients cannot choose another)"
    )
    c.add_argument("--plan", required=True, help="a plan declared in the policy (policy.dir), e.g. free, pro")
    c.add_argument("--scope", action="append", default=[], dest="scopes", metavar="SCOPE",
                   help="a scope the key holds; repeat for several (--scope admin --scope metrics)")
    c.add_argument("--expires", help="ISO 8601 date/time (UTC) or a duration like 30d, 12h (default: never)")
    c.add_argument("--label", help="free text shown by `apikey list` (never put a secret in it)")
    c = asub.add_parser("list", help="list keys (never shows secrets)")
    _add_config(c)
    c.add_argument("--tenant", help="only this tenant's keys")
    c.add_argument("--json", action="store_true",
                   help="print JSON: every field, the status and ISO 8601 UTC times")
    c = asub.add_parser("revoke", help="revoke a key by its id")
    _add_config(c)
    c.add_argument("key_id", metavar="KEY_ID",
                   help="the key id: the 12 characters between qph_ and the second _ (see `apikey list`)")


def _add_policy(sub: _Commands) -> None:
    """``policy check|explain``."""
    p = sub.add_parser("policy", help="policy tooling")
    psub = p.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    c = psub.add_parser("check", help="validate a policy directory (exit non-zero on any error)")
    c.add_argument("dir", help="the policy directory (every *.yaml file in it, in name order)")
    c = psub.add_parser("explain", help="show every rule's outcome for a request")
    _add_config(c)
    who = c.add_mutually_exclusive_group(required=True)
    who.add_argument("--key-id", help="API key id, the 12 characters between qph_ and the second _ "
                                      "(tenant, plan and scopes come from its record)")
    who.add_argument("--api-key-stdin", action="store_true",
                     help="read the whole API key from stdin instead (a pipe, a file, or typed without echo)")
    c.add_argument("--method", required=True, help="HTTP method of the request, e.g. POST")
    c.add_argument("--path", required=True, help="request path, e.g. /v1/sign")
    c.add_argument("--algorithm", help="the algorithm of the key the request uses, e.g. ml-dsa-65")
    c.add_argument("--operation", help="override the operation derived from method and path")
    c.add_argument("--source-ip", default="127.0.0.1", help="client address (default 127.0.0.1)")
    c.add_argument("--tls-group", default="X25519MLKEM768",
                   help="negotiated TLS key-exchange group (default X25519MLKEM768)")
    c.add_argument("--policy-dir", help="explain against this directory instead of the configured one")


def _add_audit(sub: _Commands) -> None:
    """``audit verify``, ``audit checkpoint``, ``audit vkeys``."""
    p = sub.add_parser("audit", help="audit log tooling")
    ausub = p.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    c = ausub.add_parser("verify", help="verify the hash chain of audit files; exit 1 on any finding")
    c.add_argument("files", nargs="+", metavar="FILE",
                   help="an audit log and its rotated files (audit.log*): they are put in rotation order")
    c.add_argument("--vkey", action="append", default=[], metavar="FILE",
                   help="a file of the log's verifier keys (one vkey per line: GET /v1/audit/vkeys); "
                        "repeatable")
    c.add_argument("--checkpoint", action="append", default=[], metavar="FILE",
                   help="a signed checkpoint (GET /v1/audit/checkpoint) to check the files against; "
                        "repeatable")
    for name, what in (
        ("checkpoint", "make the running proxy's KMS sign a checkpoint of its audit log now (admin key); "
                       "prints the signed note"),
        ("vkeys", "print the audit log's checkpoint verifier keys (ML-DSA-65, Ed25519), one per line "
                  "(audit or admin key)"),
    ):
        c = ausub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")
        _add_config(c)
        c.add_argument("--url", help="the proxy (default: https:// + the config's first server.listen)")
        c.add_argument("--cacert", help="CA file to verify the proxy (default: ca.crt beside tls.cert_file)")
        c.add_argument("--api-key-env", default="QPHER_API_KEY", metavar="VAR",
                       help="environment variable holding the API key (default QPHER_API_KEY)")


def _add_kms(sub: _Commands) -> None:
    """``kms serve``, ``kms rotate-kek``."""
    p = sub.add_parser("kms", help="a KMS node of a remote KMS tier; KMS administration (offline)")
    ksub = p.add_subparsers(dest="kms_command", required=True, metavar="ACTION")
    c = ksub.add_parser(
        "serve", help="run this host as a KMS node: kms.workers workers behind PQ mutual TLS (kms_node:)",
        description="Run a KMS node: the kms:, crypto:, storage: and kms_node: sections of the config; "
                    "gateways with kms.mode remote connect to it. SIGHUP reloads its certificates.")
    c.add_argument("-c", "--config", required=True, help="the node's config file (YAML)")
    c.add_argument("--kek-fd", type=int, default=None, help=argparse.SUPPRESS)  # set by its own re-exec
    c = ksub.add_parser("rotate-kek", help="re-wrap every key file under a new KEK (safe to re-run)")
    _add_config(c)
    new = c.add_mutually_exclusive_group(required=True)
    new.add_argument("--new-kek-file", help="file with the new KEK (32 bytes, base64, 0600)")
    new.add_argument("--new-kek-config", metavar="FILE",
                     help="a config file whose kms.kek section names the new KEK (any provider, e.g. pkcs11)")
    c.add_argument("--generate", action="store_true",
                   help="create the new KEK file (--new-kek-file, or a file provider's kms.kek.file) first")


def _add_db(sub: _Commands) -> None:
    """``db migrate|status|import-sqlite`` (storage.backend: postgresql)."""
    p = sub.add_parser("db", help="the PostgreSQL schema (storage.backend: postgresql)")
    dsub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    c = dsub.add_parser("migrate",
                        help="create or upgrade the schema, its roles, GRANTs and row-level security")
    _add_config(c)
    c = dsub.add_parser("status", help="print the schema version of the database and of this build")
    _add_config(c)
    c = dsub.add_parser("import-sqlite",
                        help="move this config's SQLite state (auth.db, kms.dir) to its PostgreSQL database")
    _add_config(c)
    c.add_argument("--from-config", default=None,
                   help="read auth.db and kms.dir from this (single-node) config instead")


def _add_fail_open(sub: _Commands) -> None:
    """``fail-open open|close``."""
    p = sub.add_parser("fail-open", help="emergency fail-open window on a running proxy (admin key)",
                       description="Open or close the emergency fail-open window of a running proxy: while "
                                   "it is open, requests the policy cannot decide are admitted (explicit "
                                   "denies still deny). Needs an API key with the admin scope.")
    fsub = p.add_subparsers(dest="fail_open_command", required=True, metavar="ACTION", title="actions")
    for name, what in (("open", "open the window for --seconds (it closes by itself at its deadline)"),
                       ("close", "close the window now")):
        c = fsub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")
        c.add_argument("--url", default="https://127.0.0.1:8443", help="the proxy (default https://127.0.0.1:8443)")
        c.add_argument("--cacert", help="CA file to verify the proxy (default: .qpher/certs/ca.crt)")
        c.add_argument("--api-key-env", default="QPHER_API_KEY", metavar="VAR",
                       help="environment variable holding an admin API key (default QPHER_API_KEY)")
        if name == "open":
            c.add_argument("--reason", required=True, help="why (recorded in the audit log)")
            c.add_argument("--seconds", type=float, default=300.0,
                           help="how long, at most policy.fail_open.max_seconds (default 300)")


def _add_bench(sub: _Commands) -> None:
    """``bench NAME``: one sub-command per entry of ``BENCHMARKS``."""
    p = sub.add_parser("bench", help="benchmarks that print figures",
                       description="Benchmarks that print figures, each with ratios against the raw library "
                                   "measured in the same run. `qpher-proxy bench NAME --help` lists a "
                                   "benchmark's own options (all take --quick).")
    bsub = p.add_subparsers(dest="what", required=True, metavar="NAME", title="benchmarks")
    for name, what in BENCHMARKS.items():
        # add_help=False and a prefix no argument uses: every word after NAME, --help included,
        # goes to the benchmark's own parser.
        c = bsub.add_parser(name, help=what, add_help=False, prefix_chars="\0")
        c.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(_dispatch(args) or 0)
    except ConfigError as exc:
        print(f"qpher-proxy: {exc.message}", file=sys.stderr)
        return 2
    except QpherError as exc:
        print(f"qpher-proxy: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int | None:
    cmd = args.command
    if cmd == "init":
        from .init import init_internal_pki, init_state

        if args.internal_pki is not None:
            init_internal_pki(
                Path(args.internal_pki), trust_domain=args.trust_domain,
                kms_hosts=tuple(args.kms_hosts) if args.kms_hosts else None,
                endpoint=args.kms_listen, force=args.force, out=sys.stdout,
            )
            return 0
        init_state(Path(args.dir), port=args.port, listen=args.listen, mldsa_cert=args.mldsa_cert,
                   renew_certs=args.renew_certs, out=sys.stdout)
        return 0
    if cmd == "version":
        return _version(args)
    if cmd == "healthcheck":
        from .healthcheck import probe, target_of

        host, port = target_of(args.config)
        healthy, line = probe(host, port, timeout=args.timeout)
        print(line, file=sys.stdout if healthy else sys.stderr)
        return 0 if healthy else 1
    if cmd == "check-config":
        from .config import load_config
        from .config.loader import MissingFile

        try:
            load_config(args.config, check_files=not args.no_files)
        except MissingFile as exc:
            raise ConfigError(f"{exc.message} (--no-files skips this check)") from None
        print(f"{args.config}: ok" + (" (files not checked)" if args.no_files else ""))
        return 0
    if cmd == "serve":
        from .config import load_config
        from .server.privsep import run

        cfg = load_config(args.config)
        return run(cfg, args.config, args.kek_fd)
    if cmd == "apikey":
        from . import admin

        return admin.apikey_command(args)
    if cmd == "policy":
        from . import admin

        return admin.policy_command(args)
    if cmd == "audit":
        if args.audit_command in ("checkpoint", "vkeys"):
            from .audit.cli import main_remote
            from .config import load_config

            cfg = load_config(args.config, check_files=False)
            url = args.url or "https://" + cfg.server.listen[0].replace("0.0.0.0", "127.0.0.1")
            cacert = args.cacert or os.path.join(os.path.dirname(cfg.tls.cert_file), "ca.crt")
            return main_remote(args.audit_command, url=url, cacert=cacert,
                               api_key=os.environ.get(args.api_key_env))
        from .audit.cli import main_verify

        return main_verify(args.files, vkeys=args.vkey, checkpoints=args.checkpoint)
    if cmd == "kms" and args.kms_command == "serve":
        from .config import load_config
        from .server.kms_node import run as run_node

        # policy:, auth: and tls: belong to gateways; the node checks its own files as it loads them
        return run_node(load_config(args.config, check_files=False), args.config, args.kek_fd)
    if cmd == "kms":
        from . import admin

        return admin.kms_command(args)
    if cmd == "db":
        from . import admin

        return admin.db_command(args)
    if cmd == "fail-open":
        from . import admin

        return admin.fail_open_command(args)
    if cmd == "bench":
        return _bench(args.what, args.options)
    raise AssertionError(cmd)  # pragma: no cover


def _version(args: argparse.Namespace) -> int:
    if args.expect:
        from .versions import check_expectations

        problems = check_expectations(args.expect)
        for line in problems:
            print(f"qpher-proxy version: {line}", file=sys.stderr)
        if problems:
            return 1
    if args.json:
        import json

        from .versions import image_facts

        print(json.dumps(image_facts(), sort_keys=False))
        return 0
    from .versions import IMAGE_LABELS, collect_versions, image_facts

    for k, v in collect_versions().items():
        print(f"{k}: {v}")
    # The same facts as a container image built from this installation records them.
    for k, v in image_facts().items():
        print(f"label {IMAGE_LABELS[k]}: {v}")
    return 0


def _bench(what: str, options: Sequence[str]) -> int:
    """The one import of the benchmarks from the runtime package, allowed by the import contract.

    They are a package of their own, ``qpher_proxy_bench``, shipped with the project but never
    needed to serve; a deployment that leaves it out gets one line saying how to get it.
    """
    try:
        from qpher_proxy_bench import run_bench
    except ModuleNotFoundError as exc:
        if exc.name != "qpher_proxy_bench":
            raise
        raise QpherError("the benchmarks (package qpher_proxy_bench) are not installed; install them "
                         "with `pip install -e .` from a source checkout of qpher-proxy",
                         code="bench_unavailable") from exc
    return run_bench(what, options)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
