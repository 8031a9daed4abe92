"""``qpher-proxy init``: a working development state in one directory.

Creates, each only if it does not exist yet (re-running never overwrites a key):

- ``certs/``: a server certificate (ECDSA P-256, SAN localhost and 127.0.0.1) issued by a local
  CA whose certificate (``certs/ca.crt``) clients trust, and optionally an ML-DSA-65 pair;
- ``ca/``: the CA private keys, in a directory only the user running ``init`` can read (the
  gateway never needs them; ``init --renew-certs`` issues new server certificates with them);
- ``kek/kek.b64``: the key-encryption key (32 random bytes, base64, 0600), and ``kms/``, the KMS's
  key store: both for the KMS user only;
- ``secrets/pepper``: the server-side pepper for API-key HMACs (0600);
- ``policies/``: a copy of the example policy files;
- ``config.yaml``: pointing at all of the above;
- ``data/gateway.db`` with a demo tenant's API key (plan ``enterprise``, scope ``admin``), whose
  value is shown once and kept in ``secrets/demo-api-key`` (0600) for the quickstart;
- ``audit/``, where the gateway writes the audit log.

``init --internal-pki DIR`` does something else: it writes only the PKI of the gateway <-> KMS
hop (``qpher_proxy.pki``: two CAs, ML-DSA-65 and ECDSA P-256, and a certificate pair of each
kind for the gateway and the KMS role) and prints, as YAML, the gateway's ``kms:`` section and a
KMS node's ``kms_node:`` section that use it. An existing internal PKI is kept unless ``--force``.

Run as root, ``init`` also creates the system users the processes drop to (``qpher`` for the
gateway, ``qpher-kms`` for the KMS workers; ``useradd --system``) and gives each its files:
the gateway's uid can read neither ``kek/``, ``kms/`` nor ``ca/``. That needs a state directory
other users can reach (every parent directory searchable); elsewhere -- a private home or
temporary directory -- the config keeps one user, and the gateway is kept from the KMS files by
Landlock alone. ``init`` says which it chose.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import TextIO

import yaml

DEMO_TENANT = "demo"
DEMO_PLAN = "enterprise"
DEMO_SCOPES = ("admin", "metrics")
GATEWAY_USER = "qpher"
KMS_USER = "qpher-kms"

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
    """The example policies: the repository's ``policies/`` beside the package, or where an
    installation put them (a container image sets ``QPHER_POLICY_EXAMPLES``)."""
    repo = Path(__file__).resolve().parent.parent / "policies"
    for here in (os.environ.get("QPHER_POLICY_EXAMPLES"), repo):
        if here and Path(here).is_dir():
            return Path(here)
    return None


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def default_config(
    port: int, mldsa: bool, users: tuple[str | None, str | None] = (None, None), listen: str | None = None
) -> dict[str, object]:
    cfg: dict[str, object] = {
        "server": {"listen": [listen or f"127.0.0.1:{port}"], "user": users[0]},
        "tls": {"cert_file": "certs/server.crt", "key_file": "certs/server.key"},
        "kms": {"dir": "kms", "user": users[1], "kek": {"provider": "file", "file": "kek/kek.b64"}},
        "auth": {"db": "data/gateway.db", "pepper_file": "secrets/pepper"},
        "policy": {"dir": "policies"},
        "audit": {"file": "audit/audit.log"},
    }
    if mldsa:
        tls = cfg["tls"]
        assert isinstance(tls, dict)
        tls["mldsa_cert_file"] = "certs/mldsa-server.crt"
        tls["mldsa_key_file"] = "certs/mldsa-server.key"
    return cfg


def reachable_by_others(directory: Path) -> bool:
    """Whether every parent of ``directory`` is searchable by other users."""
    return all(os.stat(p).st_mode & 0o001 for p in directory.parents)


def ensure_system_user(name: str) -> None:
    """``useradd --system`` unless ``name`` exists; a failure is a one-line ConfigError."""
    import pwd

    from .errors import ConfigError

    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    nologin = next((p for p in ("/usr/sbin/nologin", "/sbin/nologin") if os.path.exists(p)), "/bin/false")
    try:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                nologin,
                name,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        raise ConfigError(f"cannot create the system user {name!r}: useradd is not installed") from None
    except subprocess.CalledProcessError as exc:
        try:  # another init created it at the same moment
            pwd.getpwnam(name)
            return
        except KeyError:
            pass
        raise ConfigError(f"cannot create the system user {name!r}: {exc.stderr.strip()[:200]}") from None


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _give(path: Path, user: str | None) -> None:
    """``chown -R`` to ``user`` (a no-op when None)."""
    if user is None or not path.exists():
        return
    import pwd

    pw = pwd.getpwnam(user)
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.chown(p, pw.pw_uid, pw.pw_gid, follow_symlinks=False)


def init_state(directory: Path, *, port: int = 8443, listen: str | None = None, mldsa_cert: bool = False,
               renew_certs: bool = False, out: TextIO) -> None:
    from .tls.certs import make_dev_pki

    if listen is not None:  # refused before anything is written
        from .config import parse_listen

        port = parse_listen(listen, None, "--listen")[1]
    directory = directory.resolve()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    users = _system_users(directory)
    separate = users != (None, None)
    os.chmod(directory, 0o711 if separate else 0o700)  # others may pass through, never list
    for sub in ("secrets", "kek", "kms", "data", "audit"):
        _private_dir(directory / sub)

    pki = make_dev_pki(directory / "certs", mldsa=mldsa_cert, ca_key_dir=directory / "ca", renew=renew_certs)
    for p in pki.created:
        print(f"created {p}", file=out)
    _create_kek(directory / "kek" / "kek.b64", out)
    pepper_path = directory / "secrets" / "pepper"
    _create_pepper(pepper_path, out)
    _create_policies(directory / "policies", out)
    config_path = directory / "config.yaml"
    _create_config(config_path, port, listen, mldsa_cert, users, out)
    demo_path = directory / "secrets" / "demo-api-key"
    _create_demo_key(demo_path, directory / "data" / "gateway.db", pepper_path, out)
    _hand_over(directory, users)
    _print_users(directory, users, out)
    print(f"\nready: qpher-proxy serve --config {config_path}", file=out)
    print(f"try:   curl --cacert {pki.ca_cert} -H \"Authorization: Bearer $(cat {demo_path})\" "
          f"https://localhost:{port}/v1/info", file=out)


def init_internal_pki(
    directory: Path,
    *,
    trust_domain: str = "qpher.internal",
    kms_hosts: tuple[str, ...] | None = None,
    endpoint: str = "127.0.0.1:9443",
    force: bool = False,
    out: TextIO,
) -> None:
    """``init --internal-pki DIR``: the internal PKI, then the config sections for it.

    Everything printed is YAML (progress lines are comments), so ``init --internal-pki DIR |
    yaml`` reads the two documents: the gateway's ``kms:`` and the node's ``kms_node:``."""
    from .pki import DEFAULT_KMS_HOSTS, config_snippets, make_internal_pki

    pki = make_internal_pki(
        directory.resolve(), trust_domain=trust_domain,
        kms_hosts=DEFAULT_KMS_HOSTS if kms_hosts is None else kms_hosts, force=force,
    )
    for path in pki.files:
        print(f"# created {path}", file=out)
    print(f"# the CA keys in {pki.ca_mldsa_key.parent} are needed only to issue more certificates:",
          file=out)
    print("# keep them off the gateway and KMS hosts.", file=out)
    gateway, node = config_snippets(pki, endpoint=endpoint)
    print("#\n# gateway config.yaml (copy the gateway-* files and ca.pem to every gateway host):",
          file=out)
    print(yaml.safe_dump(gateway, sort_keys=False), end="", file=out)
    print("---\n# KMS node kms.yaml (copy the kms-* files and ca.pem to every KMS node):", file=out)
    print(yaml.safe_dump(node, sort_keys=False), end="", file=out)


def _system_users(directory: Path) -> tuple[str | None, str | None]:
    """(gateway user, KMS user): the system users, created if need be, when running as root in
    a directory other users can reach; (None, None) -- one user for every process -- otherwise."""
    if not (os.geteuid() == 0 and reachable_by_others(directory)):
        return None, None
    ensure_system_user(GATEWAY_USER)
    ensure_system_user(KMS_USER)
    return GATEWAY_USER, KMS_USER


def _create_kek(kek_path: Path, out: TextIO) -> None:
    from .kms.worker.kek import generate_kek_file

    if not kek_path.exists():
        kek_id = generate_kek_file(kek_path)
        print(f"created {kek_path} (KEK id {kek_id})", file=out)


def _create_pepper(pepper_path: Path, out: TextIO) -> None:
    from .auth.apikeys import generate_pepper_file

    if not pepper_path.exists():
        generate_pepper_file(pepper_path)
        print(f"created {pepper_path}", file=out)


def _create_policies(policies: Path, out: TextIO) -> None:
    """A copy of the repository's example policies, or the built-in minimal one without them."""
    if policies.exists():
        return
    src = _examples_dir()
    if src is not None:
        shutil.copytree(src, policies)
    else:
        policies.mkdir(mode=0o755)
        (policies / "00-default.yaml").write_text(_BUILTIN_POLICY)
    print(f"created {policies}/", file=out)


def _create_config(
    config_path: Path, port: int, listen: str | None, mldsa: bool, users: tuple[str | None, str | None],
    out: TextIO,
) -> None:
    """``config.yaml``, written whole through a temporary file."""
    if config_path.exists():
        return
    text = (
        "# Written by `qpher-proxy init`. Every option, with its default, is documented in\n"
        "# config.example.yaml at the repository root.\n"
        + yaml.safe_dump(default_config(port, mldsa, users, listen), sort_keys=False)
    )
    tmp = config_path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, config_path)
    print(f"created {config_path}", file=out)


def _create_demo_key(demo_path: Path, db: Path, pepper_path: Path, out: TextIO) -> None:
    """The demo tenant's API key, stored in ``db`` and its value kept in ``demo_path`` (0600)."""
    from .auth.apikeys import APIKeyStore, load_pepper

    if demo_path.exists():
        return
    with APIKeyStore(db, load_pepper(pepper_path)) as store:
        record, full_key = store.create(
            DEMO_TENANT, DEMO_PLAN, DEMO_SCOPES, label="demo (qpher-proxy init)"
        )
    _write_private(demo_path, full_key.encode("ascii") + b"\n")
    print(f"created demo API key {record.key_id} for tenant {DEMO_TENANT!r} (plan {DEMO_PLAN}, "
          f"scopes {', '.join(DEMO_SCOPES)}); its value is in {demo_path}", file=out)


def _hand_over(directory: Path, users: tuple[str | None, str | None]) -> None:
    """The gateway's directories to the gateway user, the KEK and key store to the KMS user."""
    gw_user, kms_user = users
    for sub in ("certs", "secrets", "data", "audit"):
        _give(directory / sub, gw_user)
    for sub in ("kek", "kms"):
        _give(directory / sub, kms_user)


def _print_users(directory: Path, users: tuple[str | None, str | None], out: TextIO) -> None:
    gw_user, kms_user = users
    if gw_user is not None:
        print(f"users: the gateway runs as {gw_user!r}, the KMS workers as {kms_user!r}; "
              f"{directory / 'kek'} and {directory / 'kms'} are readable by {kms_user!r} only", file=out)
    elif os.geteuid() == 0:
        print(f"note: {directory} is inside a directory other users cannot enter, so every process runs "
              "as root; the gateway is kept from the KMS files by Landlock alone. For separate users, "
              "run init in a directory other users can reach (e.g. /var/lib/qpher-proxy).", file=out)
