"""The gateway process confines itself once its ports are bound (see :mod:`qpher_proxy.sandbox`).

Order: drop to ``server.user`` (started as root), then Landlock (any uid). Every file the
gateway opens afterwards must be on the allow-list built here from its config; the KMS
directory and the KEK file never are, and a config that would put them under a granted
directory stops start-up.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..errors import ConfigError
from ..sandbox import (
    READ,
    READ_WRITE,
    Grant,
    RunAs,
    drop_privileges,
    landlock_abi,
    landlock_restrict,
    plan_grants,
    preload,
)

log = logging.getLogger("qpher.server")

# Read-only system locations: shared libraries, CA bundles, time zones, /etc/hosts and friends.
SYSTEM_READ = ("/usr", "/lib", "/lib64", "/etc", "/dev/urandom")
# Modules that only the KMS worker or offline commands use: never imported by the gateway.
KMS_ONLY = (
    "qpher_proxy.kms.worker",
    "qpher_proxy.cli", "qpher_proxy.admin", "qpher_proxy.init", "qpher_proxy.__main__",
    "qpher_proxy.server.__main__",
)
# Standard-library modules looked up lazily at run time (codecs, HTTP date parsing, ...).
LAZY_STDLIB = ("encodings.idna", "encodings.ascii", "encodings.latin_1", "encodings.utf_8", "email.utils",
               "http.client", "ssl", "sqlite3", "uuid", "zlib", "hmac", "hashlib", "secrets", "decimal")


def protected_paths(cfg: Config) -> list[str]:
    out = [cfg.kms.dir]
    if cfg.kms.kek.provider == "file" and cfg.kms.kek.file:
        out.append(cfg.kms.kek.file)
    return out


def gateway_grants(cfg: Config) -> list[Grant]:
    """The gateway's allow-list, checked against the protected paths (ConfigError on overlap)."""
    protected = protected_paths(cfg)
    code: list[Grant] = []
    package_dir = str(Path(__file__).resolve().parent.parent)
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, package_dir,
             *(p for p in sys.path if p)}
    for root in sorted(roots):
        try:  # an import root that happens to hold the state directory (the checkout) is left out
            code += plan_grants([Grant(root, READ)], protected)
        except ConfigError:
            continue
    t, u, k = cfg.tls, cfg.upstream, cfg.kms
    files = [t.cert_file, t.key_file, t.mldsa_cert_file, t.mldsa_key_file, t.client_ca,
             u.ca_file, u.client_cert, u.client_key, cfg.auth.pepper_file, cfg.policy.dir]
    if k.mode == "remote":  # the internal hop's client chains, reread on SIGHUP
        files += [k.client_cert_file, k.client_key_file, k.client_ecdsa_cert_file, k.client_ecdsa_key_file,
                  k.ca_file]
    own = [Grant(f, READ) for f in files if f]
    own += [Grant(os.path.dirname(os.path.abspath(cfg.audit.file)), READ_WRITE),
            Grant(os.path.dirname(os.path.abspath(cfg.auth.db)), READ_WRITE),
            Grant("/dev/null", READ_WRITE)]
    return code + plan_grants([Grant(p, READ) for p in SYSTEM_READ], protected) + plan_grants(own, protected)


@dataclass(frozen=True, slots=True)
class Confinement:
    """What the gateway process does to itself after binding: see the module docstring."""

    user: RunAs | None
    sandbox: str  # auto | required | off

    def apply(self, cfg: Config) -> None:
        if self.user is not None:
            preload(["qpher_proxy"], skip=KMS_ONLY)
            for name in LAZY_STDLIB:
                __import__(name)
            try:
                drop_privileges(self.user)
            except OSError as exc:
                raise ConfigError(f"server.user: cannot become {self.user.name!r}: {exc.strerror}") from None
            log.info("gateway runs as an unprivileged user", extra={"fields": {"uid": self.user.uid}})
        for path in (cfg.audit.file, cfg.auth.db):  # their directories are granted whole, so they must exist
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        grants = gateway_grants(cfg) if self.sandbox != "off" else []
        if self.sandbox == "off":
            log.warning("server.sandbox is off: the gateway is not confined by Landlock")
        elif landlock_abi() <= 0:
            if self.sandbox == "required":
                raise ConfigError("server.sandbox: required, but this kernel offers no Landlock")
            log.warning(
                "this kernel offers no Landlock: keeping the gateway away from the KMS files is "
                "by convention only" + ("" if self.user is not None else " (and it runs as the same user)")
            )
        else:
            try:
                abi = landlock_restrict(grants)
            except OSError as exc:
                raise ConfigError(
                    f"server.sandbox: Landlock refused the gateway's rules: {exc.strerror}"
                ) from None
            log.info("gateway confined by Landlock", extra={"fields": {
                "abi": abi, "protected": protected_paths(cfg), "paths": len(grants)}})


__all__ = ["Confinement", "gateway_grants", "protected_paths"]
