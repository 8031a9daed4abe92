"""Offline admin commands: API keys, policy tooling, KEK rotation, and the fail-open client.

These run beside (or instead of) a proxy, against the same state directory. ``kms rotate-kek``
is the one command that loads KMS-side modules in this process, on purpose: it must run with
the proxy stopped (the key store's lock is checked).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .config import load_config
from .errors import ConfigError, NotFound, QpherError


def apikey_command(args: argparse.Namespace) -> int:
    from .auth.apikeys import APIKeyStore, load_pepper, parse_expiry

    cfg = load_config(args.config)
    with APIKeyStore(cfg.auth.db, load_pepper(cfg.auth.pepper_file), audit=_audit(cfg)) as store:
        if args.apikey_command == "create":
            expires = parse_expiry(args.expires, time.time()) if args.expires else None
            record, full_key = store.create(args.tenant, args.plan, args.scopes, expires_at=expires,
                                            label=args.label)
            print(f"key id:  {record.key_id}", file=sys.stderr)
            print(f"tenant:  {record.tenant}  plan: {record.plan}  scopes: {', '.join(sorted(record.scopes)) or '-'}",
                  file=sys.stderr)
            print("the key is shown once, below; store it now:", file=sys.stderr)
            print(full_key)
            return 0
        if args.apikey_command == "list":
            records = store.list(args.tenant)
            if args.json:
                print(json.dumps([r.to_dict() for r in records], indent=2, default=str))
                return 0
            print(f"{'KEY ID':14} {'TENANT':20} {'PLAN':12} {'STATUS':8} SCOPES")
            now = time.time()
            for r in records:
                print(f"{r.key_id:14} {r.tenant:20} {r.plan:12} {r.status(now).value:8} "
                      f"{','.join(sorted(r.scopes)) or '-'}")
            return 0
        if args.apikey_command == "revoke":
            store.revoke(args.key_id)
            print(f"revoked {args.key_id} (a running proxy refuses it within auth.cache_ttl)")
            return 0
    raise AssertionError(args.apikey_command)  # pragma: no cover


def _audit(cfg):  # type: ignore[no-untyped-def]
    from .audit import AuditLog

    os.makedirs(os.path.dirname(cfg.audit.file), mode=0o700, exist_ok=True)
    return AuditLog(cfg.audit.file, rotate_bytes=cfg.audit.rotate_bytes)


def policy_command(args: argparse.Namespace) -> int:
    from .policy.cli import check, explain_text

    if args.policy_command == "check":
        ok, lines = check(args.dir)
        for line in lines:
            print(line, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1

    from .api import RouteMethodNotAllowed, resolve
    from .auth.apikeys import APIKeyStore, load_pepper
    from .policy.loader import check_policy_dir
    from .policy.model import RequestFacts

    cfg = load_config(args.config)
    with APIKeyStore(cfg.auth.db, load_pepper(cfg.auth.pepper_file)) as store:
        record = store.get(args.key_id)
    if record is None:
        raise NotFound(f"no API key {args.key_id!r}")
    directory = args.policy_dir or cfg.policy.dir
    ps, errors, _warnings = check_policy_dir(directory)
    if ps is None:
        for e in errors:
            print(e, file=sys.stderr)
        return 1
    operation = args.operation
    if operation is None:
        try:
            resolved = resolve(args.method.upper(), args.path)
        except RouteMethodNotAllowed as exc:
            raise QpherError(exc.message, code=exc.code) from None
        operation = resolved[0].operation if resolved else "forward"
    facts = RequestFacts(
        tenant=record.tenant, plan=record.plan, scopes=record.scopes, api_key_id=record.key_id,
        method=args.method.upper(), path=args.path, operation=operation, algorithm=args.algorithm,
        source_ip=args.source_ip, tls_group=args.tls_group,
        tls_pq=args.tls_group.upper() in ("X25519MLKEM768", "SECP256R1MLKEM768", "SECP384R1MLKEM1024"),
        now=_dt.datetime.now(_dt.timezone.utc),
    )
    print(explain_text(ps, facts))
    return 0


def _become_kms_user(name: str) -> None:
    """Run an offline KMS command as the KMS user, so that every file it writes (re-sealed key
    versions, a new KEK file) stays readable by the workers and by nobody else."""
    from .sandbox import drop_privileges, lookup_user, preload

    user = lookup_user(name, "kms.user")
    preload(["qpher_proxy.kms", "qpher_proxy.crypto"],
            skip=["qpher_proxy.kms.client", "qpher_proxy.kms.supervisor", "qpher_proxy.crypto.backends.liboqs"])
    try:
        drop_privileges(user)
    except OSError as exc:
        raise ConfigError(f"kms.user: cannot become {name!r}: {exc.strerror}") from None


def kms_command(args: argparse.Namespace) -> int:
    from .kms.admin import rotate_kek_command
    from .kms.model import KEKSettings

    cfg = load_config(args.config)
    if os.geteuid() == 0 and cfg.kms.user:
        _become_kms_user(cfg.kms.user)
    k = cfg.kms.kek
    result, old_id, new_id = rotate_kek_command(
        cfg.kms.dir, KEKSettings(provider=k.provider, file=k.file, env=k.env), args.new_kek_file,
        generate=args.generate,
        progress=lambda done, total: print(f"\rre-wrapped {done}/{total}", end="", file=sys.stderr),
    )
    print(file=sys.stderr)
    print(f"KEK rotated: {old_id} -> {new_id} ({result})")
    print(f"now point kms.kek at the new KEK ({args.new_kek_file}) before starting the proxy")
    return 0


def fail_open_command(args: argparse.Namespace) -> int:
    key = os.environ.get(args.api_key_env)
    if not key:
        raise ConfigError(f"set {args.api_key_env} to an API key with the admin scope")
    cafile = args.cacert or str(Path(".qpher/certs/ca.crt"))
    ctx = ssl.create_default_context(cafile=cafile)
    url = args.url.rstrip("/") + "/admin/fail-open"
    if args.fail_open_command == "open":
        req = urllib.request.Request(url, method="POST",
                                     data=json.dumps({"reason": args.reason, "seconds": args.seconds}).encode())
        req.add_header("content-type", "application/json")
    else:
        req = urllib.request.Request(url, method="DELETE")
    req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:  # noqa: S310 (https only)
            print(resp.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        print(exc.read().decode(errors="replace"), file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"qpher-proxy: cannot reach {args.url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
