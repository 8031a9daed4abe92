"""``qpher-proxy init``: a working development state in one directory.

Creates, each only if it does not exist yet (re-running never overwrites a key):

- ``certs/``: a local CA and a server certificate (ECDSA P-256, SAN localhost and 127.0.0.1),
  and optionally an ML-DSA-65 pair; private keys 0600 in a 0700 directory;
- ``secrets/kek.b64``: the key-encryption key (32 random bytes, base64, 0600);
- ``secrets/pepper``: the server-side pepper for API-key HMACs (0600);
- ``policies/``: a copy of the example policy files;
- ``config.yaml``: pointing at all of the above;
- ``gateway.db`` with a demo tenant's API key (plan ``enterprise``, scope ``admin``), whose
  value is shown once and kept in ``secrets/demo-api-key`` (0600) for the quickstart.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TextIO

import yaml

DEMO_TENANT = "demo"
DEMO_PLAN = "enterprise"
DEMO_SCOPES = ("admin", "metrics")

_BUILTIN_POLICY = """\
# Minimal built-in policy (the repository's policies/ folder was not found).
version: 1
plans:
  enterprise:
    rate_limit: {requests_per_second: 1000, burst: 2000}
    algorithms: ["*"]
    operations: ["*"]
rules:
  - id: admin-scope-required
    effect: deny
    match: {path: /admin/**}
    unless: {scope: admin}
    reason: admin endpoints need an API key with the admin scope
  - id: known-plans
    effect: allow
    match: {plan: enterprise}
    reason: enterprise plan
"""


def _examples_dir() -> Path | None:
    here = Path(__file__).resolve().parent.parent / "policies"
    return here if here.is_dir() else None


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def default_config(port: int, mldsa: bool) -> dict[str, object]:
    cfg: dict[str, object] = {
        "server": {"listen": [f"127.0.0.1:{port}"]},
        "tls": {"cert_file": "certs/server.crt", "key_file": "certs/server.key"},
        "kms": {"dir": "kms", "kek": {"provider": "file", "file": "secrets/kek.b64"}},
        "auth": {"db": "gateway.db", "pepper_file": "secrets/pepper"},
        "policy": {"dir": "policies"},
        "audit": {"file": "audit/audit.log"},
    }
    if mldsa:
        tls = cfg["tls"]
        assert isinstance(tls, dict)
        tls["mldsa_cert_file"] = "certs/mldsa-server.crt"
        tls["mldsa_key_file"] = "certs/mldsa-server.key"
    return cfg


def init_state(directory: Path, *, port: int = 8443, mldsa_cert: bool = False, out: TextIO) -> None:
    from .auth.apikeys import APIKeyStore, generate_pepper_file, load_pepper
    from .kms.kek import generate_kek_file
    from .tls.certs import make_dev_pki

    directory = directory.resolve()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    secrets_dir = directory / "secrets"
    secrets_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(secrets_dir, 0o700)

    pki = make_dev_pki(directory / "certs", mldsa=mldsa_cert)
    for p in pki.created:
        print(f"created {p}", file=out)

    kek_path = secrets_dir / "kek.b64"
    if not kek_path.exists():
        kek_id = generate_kek_file(kek_path)
        print(f"created {kek_path} (KEK id {kek_id})", file=out)
    pepper_path = secrets_dir / "pepper"
    if not pepper_path.exists():
        generate_pepper_file(pepper_path)
        print(f"created {pepper_path}", file=out)

    policies = directory / "policies"
    if not policies.exists():
        src = _examples_dir()
        if src is not None:
            shutil.copytree(src, policies)
        else:
            policies.mkdir(mode=0o755)
            (policies / "00-default.yaml").write_text(_BUILTIN_POLICY)
        print(f"created {policies}/", file=out)

    config_path = directory / "config.yaml"
    if not config_path.exists():
        text = (
            "# Written by `qpher-proxy init`. Every option, with its default, is documented in\n"
            "# config.example.yaml at the repository root.\n"
            + yaml.safe_dump(default_config(port, mldsa_cert), sort_keys=False)
        )
        tmp = config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, config_path)
        print(f"created {config_path}", file=out)

    demo_path = secrets_dir / "demo-api-key"
    if not demo_path.exists():
        with APIKeyStore(directory / "gateway.db", load_pepper(pepper_path)) as store:
            record, full_key = store.create(DEMO_TENANT, DEMO_PLAN, DEMO_SCOPES, label="demo (qpher-proxy init)")
        _write_private(demo_path, full_key.encode("ascii") + b"\n")
        print(f"created demo API key {record.key_id} for tenant {DEMO_TENANT!r} (plan {DEMO_PLAN}, "
              f"scopes {', '.join(DEMO_SCOPES)}); its value is in {demo_path}", file=out)
    print(f"\nready: qpher-proxy serve --config {config_path}", file=out)
    print(f"try:   curl --cacert {pki.ca_cert} -H \"Authorization: Bearer $(cat {demo_path})\" "
          f"https://localhost:{port}/v1/info", file=out)
