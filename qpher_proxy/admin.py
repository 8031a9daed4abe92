"""Offline admin commands: API keys, policy tooling, KEK rotation, and the fail-open client.

These run beside (or instead of) a proxy, against the same state directory. ``kms rotate-kek``
is the one command that loads KMS-side modules in this process, on purpose: it must run with
the proxy stopped (the key store's lock is checked).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import getpass
import hmac
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from .config import load_config
from .errors import ConfigError, InvalidInput, NotFound, QpherError

if TYPE_CHECKING:
    from .audit import AuditLog
    from .auth.apikeys import APIKeyRecord, APIKeyStore
    from .auth.pg_apikeys import PgAPIKeyStore
    from .config import Config


def apikey_command(args: argparse.Namespace) -> int:
    from .auth.apikeys import check_grants, check_key_id, iso_time, parse_expiry

    cfg = load_config(args.config)
    if args.apikey_command == "create":
        plans, scopes = _policy_grants(cfg.policy.dir)
        check_grants(args.plan, args.scopes, plans=plans, known_scopes=scopes)
    key_id = check_key_id(args.key_id) if args.apikey_command == "revoke" else None
    with _key_store(cfg, audit=_audit(cfg)) as store:
        if args.apikey_command == "create":
            expires = parse_expiry(args.expires, time.time()) if args.expires else None
            record, full_key = store.create(args.tenant, args.plan, args.scopes, expires_at=expires,
                                            label=args.label)
            print(f"key id:  {record.key_id}", file=sys.stderr)
            print(
                f"tenant:  {record.tenant}  plan: {record.plan}  "
                f"scopes: {', '.join(sorted(record.scopes)) or '-'}",
                file=sys.stderr,
            )
            print("the key is shown once, below; store it now:", file=sys.stderr)
            print(full_key)
            return 0
        if args.apikey_command == "list":
            records = store.list(args.tenant)
            now = time.time()
            if args.json:
                print(json.dumps([r.to_json(now) for r in records], indent=2))
            else:
                print(_key_table(records, now), end="")
            return 0
        if args.apikey_command == "revoke":
            assert key_id is not None
            before = store.get(key_id)
            if before is None:
                raise NotFound(f"no API key with id {key_id!r}")
            if before.revoked_at is not None:
                # Exit 0, as `vault token revoke` does for a token already revoked: the key ends
                # revoked either way, so a retried or re-run script does not fail the second
                # time. The line says that nothing changed. An unknown id stays an error.
                print(f"{key_id} was already revoked at {iso_time(before.revoked_at)}; nothing changed")
                return 0
            store.revoke(key_id)
            print(f"revoked {key_id} (a running proxy refuses it within auth.cache_ttl, at most 1 s)")
            return 0
    raise AssertionError(args.apikey_command)  # pragma: no cover


def _key_store(cfg: Config, audit: AuditLog | None = None) -> APIKeyStore | PgAPIKeyStore:
    """The API key records of ``cfg``: the SQLite file (``storage.backend: sqlite``), or
    PostgreSQL as the admin role (``<storage.role_prefix>_admin``, one connection)."""
    from .auth.apikeys import APIKeyStore, load_pepper

    pepper = load_pepper(cfg.auth.pepper_file)
    if cfg.storage.backend == "postgresql":
        from .auth.pg_apikeys import PgAPIKeyStore

        return PgAPIKeyStore.from_config(cfg.storage, pepper, kind="admin", pool_size=1, audit=audit)
    return APIKeyStore(cfg.auth.db, pepper, audit=audit)


def _key_table(records: list[APIKeyRecord], now: float) -> str:
    """``apikey list`` as aligned columns; times in UTC, to the second."""
    from .auth.apikeys import iso_time

    header = ("KEY ID", "TENANT", "PLAN", "STATUS", "CREATED", "EXPIRES", "SCOPES", "LABEL")
    rows = [header] + [
        (
            r.key_id,
            r.tenant,
            r.plan,
            r.status(now),
            iso_time(r.created_at) or "-",
            iso_time(r.expires_at) or "-",
            ",".join(sorted(r.scopes)) or "-",
            r.label or "",
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n" for row in rows
    )


def _policy_grants(directory: str) -> tuple[frozenset[str], frozenset[str]]:
    """The plans the policy at ``directory`` declares, and the scopes that mean something there:
    the product's own and every scope one of its rules names."""
    from .auth.apikeys import PRODUCT_SCOPES
    from .policy.loader import check_policy_dir

    ps, errors, _warnings = check_policy_dir(directory)
    if ps is None:
        raise ConfigError(f"policy.dir: the policy in {directory!r} does not load ({len(errors)} error(s); "
                          f"`qpher-proxy policy check {directory}` lists them)")
    scopes = set(PRODUCT_SCOPES)
    for rule in ps.rules:
        for matchers in (rule.match, rule.unless or {}):
            named = matchers.get("scope")  # the loader makes it a frozenset of names
            if isinstance(named, frozenset):
                scopes.update(named)
    return frozenset(ps.plans), frozenset(scopes)


def _read_api_key() -> str:
    """An API key from stdin: piped (``< key-file``) or typed at a terminal without echo. Never
    from argv, which other local users can read in /proc and shells keep in their history."""
    if sys.stdin.isatty():
        return getpass.getpass("API key: ")
    return sys.stdin.read(4096)


def _audit(cfg: Config) -> AuditLog:
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
    from .auth.apikeys import check_key_id, split_api_key
    from .policy.loader import check_policy_dir
    from .policy.model import RequestFacts

    cfg = load_config(args.config)
    secret: str | None = None
    if args.api_key_stdin:
        key_id, secret = split_api_key(_read_api_key())
    else:
        key_id = check_key_id(args.key_id)
    with _key_store(cfg) as store:
        found = store.lookup(key_id)
        if found is None:
            raise NotFound(f"no API key with id {key_id!r}")
        record, mac = found
        if secret is not None and not hmac.compare_digest(store.mac(key_id, secret), mac):
            raise InvalidInput(f"the API key on stdin has the id {key_id!r} but not its secret "
                               "(a gateway answers 401 before asking the policy)")
    status = record.status(time.time())
    if status != "active":
        print(
            f"note: key {key_id} is {status}; a gateway answers 401 before asking the policy", file=sys.stderr
        )
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
        tenant=record.tenant, plan=record.plan, scopes=frozenset(record.scopes), api_key_id=record.key_id,
        method=args.method.upper(), path=args.path, operation=operation, algorithm=args.algorithm,
        source_ip=args.source_ip, tls_group=args.tls_group,
        tls_pq=args.tls_group.upper() in ("X25519MLKEM768", "SECP256R1MLKEM768", "SECP384R1MLKEM1024"),
        now=_dt.datetime.now(_dt.UTC),
    )
    print(explain_text(ps, facts))
    return 0


def _become_kms_user(name: str) -> None:
    """Run an offline KMS command as the KMS user, so that every file it writes (re-sealed key
    versions, a new KEK file) stays readable by the workers and by nobody else."""
    from .sandbox import drop_privileges, lookup_user, preload

    user = lookup_user(name, "kms.user")
    preload(
        ["qpher_proxy.kms", "qpher_proxy.crypto"],
        skip=["qpher_proxy.kms.client", "qpher_proxy.kms.launcher", "qpher_proxy.kms.worker.backends.liboqs"],
    )
    try:
        drop_privileges(user)
    except OSError as exc:
        raise ConfigError(f"kms.user: cannot become {name!r}: {exc.strerror}") from None


def kms_command(args: argparse.Namespace) -> int:
    from .kms.wire.model import KEKSettings
    from .kms.worker.admin import load_pkcs11_binding, rotate_kek_command
    from .server.settings import kek_settings

    cfg = load_config(args.config)
    current = kek_settings(cfg.kms.kek)
    new_kek: str | KEKSettings
    if args.new_kek_config is not None:
        # only the kms.kek section of that file counts; its paths are relative to it
        new_kek = kek_settings(load_config(args.new_kek_config, check_files=False).kms.kek)
        where = f"the kms.kek section of {args.new_kek_config}"
    else:
        new_kek, where = args.new_kek_file, args.new_kek_file
    if os.geteuid() == 0 and cfg.kms.user:
        if "pkcs11" in (current.provider, getattr(new_kek, "provider", "file")):
            load_pkcs11_binding()  # while readable; the token itself is opened as the KMS user
        _become_kms_user(cfg.kms.user)
    dsn = None
    if cfg.storage.backend == "postgresql":
        dsn = _owner_dsn(cfg)
    result, old_id, new_id = rotate_kek_command(
        cfg.kms.dir, current, new_kek,
        generate=args.generate, dsn=dsn, connect_timeout=cfg.storage.connect_timeout,
        progress=lambda done, total: print(f"\rre-wrapped {done}/{total}", end="", file=sys.stderr),
    )
    print(file=sys.stderr)
    print(f"KEK rotated: {old_id} -> {new_id} ({result})")
    print(f"now point kms.kek at the new KEK ({where}) before starting the proxy")
    return 0


def _owner_dsn(cfg: Config) -> str:
    if cfg.storage.backend != "postgresql":
        raise ConfigError("storage.backend is not postgresql: the `db` commands manage the PostgreSQL schema")
    if cfg.storage.dsn is None:
        raise ConfigError("storage.dsn: the `db` commands need a DSN whose user owns the schema")
    return cfg.storage.dsn


def db_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, check_files=False)
    dsn = _owner_dsn(cfg)
    prefix = cfg.storage.role_prefix
    timeout = cfg.storage.connect_timeout
    if args.db_command == "migrate":
        from .storage.migrations import migrate

        before, after = migrate(dsn, prefix, connect_timeout=timeout)
        print(f"schema version {before} -> {after}" if after != before
              else f"schema version {after}: up to date")
        return 0
    if args.db_command == "status":
        from .storage.migrations import SCHEMA_VERSION, current_version
        from .storage.postgres import connect_owner, mapped

        conn = connect_owner(dsn, timeout)
        try:
            with mapped("reading the schema version"), conn.transaction():
                version = current_version(conn)
        finally:
            conn.close()
        print(f"database schema version {version}; this build: {SCHEMA_VERSION}")
        return 0 if version == SCHEMA_VERSION else 1
    from .storage.import_sqlite import import_sqlite

    src = load_config(args.from_config, check_files=False) if args.from_config else cfg
    report = import_sqlite(dsn=dsn, role_prefix=prefix, auth_db=src.auth.db, kms_dir=src.kms.dir,
                           connect_timeout=timeout)
    skipped = ", ".join(f"{n} {k}" for k, n in sorted(report.skipped.items())) or "nothing"
    print(f"imported {report.api_keys} API keys, {report.usage_rows} usage rows, {report.keys} keys with "
          f"{report.versions} sealed versions{', the KEK check' if report.canary else ''}"
          f"{f', {report.audit_logs} audit log key set(s)' if report.audit_logs else ''}; "
          f"skipped (already present): {skipped}")
    return 0


def fail_open_command(args: argparse.Namespace) -> int:
    key = os.environ.get(args.api_key_env)
    if not key:
        raise ConfigError(f"set {args.api_key_env} to an API key with the admin scope")
    cafile = args.cacert or str(Path(".qpher/certs/ca.crt"))
    ctx = ssl.create_default_context(cafile=cafile)
    url = args.url.rstrip("/") + "/admin/fail-open"
    if args.fail_open_command == "open":
        req = urllib.request.Request(
            url, method="POST", data=json.dumps({"reason": args.reason, "seconds": args.seconds}).encode()
        )
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
