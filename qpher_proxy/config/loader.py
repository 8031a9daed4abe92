"""Strict YAML configuration loading.

Every mistake stops start-up with ONE line naming the file, the dotted path and what was
expected, for example::

    config.yaml: tls.min_version: expected "1.2" or "1.3", got "1.1"

Unknown keys, wrong types, out-of-range values and missing files are all errors; nothing is
silently ignored or coerced (``"10"`` is not an integer, ``yes`` is not a string). The one
reading that is not literal: a choice spelled like a number (``tls.min_version``) also accepts
that number unquoted, since YAML reads ``min_version: 1.2`` as the float 1.2 and a person wrote
the version "1.2". ``check_files=False`` skips the existence of files, for checking a config
written for another machine (``qpher-proxy check-config --no-files``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from ..errors import ConfigError
from .model import Config

_NoneType = type(None)


class MissingFile(ConfigError):
    """A file the config names does not exist (``check_files=False`` skips this check)."""


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"' if len(value) <= 60 else f'"{value[:57]}..."'
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return repr(value)


def _type_name(tp: Any) -> str:
    if tp is str:
        return "a string"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if get_origin(tp) is Literal:
        choices = [f'"{c}"' for c in get_args(tp)]
        return " or ".join([", ".join(choices[:-1]), choices[-1]]) if len(choices) > 1 else choices[0]
    if get_origin(tp) is tuple:
        return f"a list of {_type_name(get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


class _Loader:
    def __init__(self, source: str, base_dir: Path, check_files: bool = True) -> None:
        self.source = source
        self.base_dir = base_dir
        self.check_files = check_files

    def fail(self, path: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{self.source}: {path}: {message}")

    def build(self, cls: Any, data: Any, path: str) -> Any:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.fail(path or "(top level)", f"expected a mapping, got {_show(data)}")
        hints = get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            dotted = f"{path}.{key}" if path else str(key)
            if key not in fields:
                known = ", ".join(sorted(fields))
                self.fail(dotted, f"unknown option (expected one of: {known})")
            kwargs[key] = self.value(hints[key], value, dotted, fields[key].metadata)
        for name, f in fields.items():  # defaults: paths relative to the config file too, as documented
            if name in kwargs:
                continue
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = self.build(hints[name], {}, f"{path}.{name}" if path else name)
            elif f.metadata.get("path") and isinstance(f.default, str):
                kwargs[name] = str(self.base_dir / os.path.expanduser(f.default))
        return cls(**kwargs)

    def value(self, tp: Any, value: Any, path: str, md: typing.Mapping[str, Any]) -> Any:
        origin = get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not _NoneType]
            if value is None:
                return None
            (tp,) = args
            origin = get_origin(tp)
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, path)
        if origin is Literal:
            if type(value) is float and repr(value) in get_args(tp):
                return repr(value)  # an unquoted 1.2 in YAML: the choice "1.2" (see the module docstring)
            if not isinstance(value, str) or value not in get_args(tp):
                self.fail(path, f"expected {_type_name(tp)}, got {_show(value)}")
            return value
        if origin is tuple:
            (item_tp, _ellipsis) = get_args(tp)
            if not isinstance(value, list):
                self.fail(path, f"expected {_type_name(tp)}, got {_show(value)}")
            return tuple(self.value(item_tp, v, f"{path}[{i}]", {}) for i, v in enumerate(value))
        if tp is bool:
            if not isinstance(value, bool):
                self.fail(path, f"expected true or false, got {_show(value)}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(path, f"expected an integer, got {_show(value)}")
            return self.ranged(value, path, md)
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail(path, f"expected a number, got {_show(value)}")
            return self.ranged(float(value), path, md)
        if tp is str:
            if not isinstance(value, str):
                self.fail(path, f"expected a string, got {_show(value)}")
            if not value:
                self.fail(path, "expected a non-empty string")
            if md.get("path"):
                p = Path(os.path.expanduser(value))
                if not p.is_absolute():
                    p = self.base_dir / p
                if md.get("must_exist") and self.check_files and not p.exists():
                    raise MissingFile(f"{self.source}: {path}: file not found: {str(p)!r}")
                return str(p)
            return value
        raise AssertionError(f"unsupported config type {tp!r} at {path}")  # pragma: no cover

    def ranged(self, value: Any, path: str, md: typing.Mapping[str, Any]) -> Any:
        lo, hi = md.get("min"), md.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.fail(path, f"expected a value between {lo:g} and {hi:g}, got {_show(value)}")
        return value


def _check(cfg: Config, ld: _Loader) -> None:
    """Cross-field rules that a type alone cannot say."""
    for i, addr in enumerate(cfg.server.listen):
        parse_listen(addr, ld, f"server.listen[{i}]")
    if not cfg.tls.groups:
        ld.fail("tls.groups", "expected at least one group")
    if (cfg.tls.mldsa_cert_file is None) != (cfg.tls.mldsa_key_file is None):
        ld.fail("tls.mldsa_cert_file", "expected mldsa_cert_file and mldsa_key_file together")
    if cfg.tls.client_auth != "none" and cfg.tls.client_ca is None:
        ld.fail("tls.client_ca", f'expected a CA file when client_auth is "{cfg.tls.client_auth}"')
    url = cfg.upstream.url
    if url is not None and not (url.startswith("http://") or url.startswith("https://")):
        ld.fail("upstream.url", f"expected an http:// or https:// URL, got {_show(url)}")
    want_scheme = {"h2": "https://", "h2c": "http://"}.get(cfg.upstream.protocol)
    if url is not None and want_scheme is not None and not url.startswith(want_scheme):
        ld.fail("upstream.protocol",
                f"{cfg.upstream.protocol} needs an {want_scheme} upstream.url, got {_show(url)}")
    if (cfg.upstream.client_cert is None) != (cfg.upstream.client_key is None):
        ld.fail("upstream.client_cert", "expected client_cert and client_key together")
    _check_scale_out(cfg, ld)
    _check_kms_tier(cfg, ld)
    _check_kek(cfg, ld)


def _check_kek(cfg: Config, ld: _Loader) -> None:
    """kms.kek provider pkcs11: module, token and key labels, and exactly one PIN source."""
    k = cfg.kms.kek
    if k.provider != "pkcs11":
        return
    for name in ("pkcs11_module", "pkcs11_token_label", "pkcs11_key_label"):
        if getattr(k, name) is None:
            ld.fail(f"kms.kek.{name}", 'expected a value when provider is "pkcs11"')
    if (k.pkcs11_pin_file is None) == (k.pkcs11_pin_env is None):
        ld.fail("kms.kek.pkcs11_pin_file",
                'expected exactly one of pkcs11_pin_file and pkcs11_pin_env when provider is "pkcs11" '
                "(the PIN itself never goes in the config)")


def _check_kms_tier(cfg: Config, ld: _Loader) -> None:
    """kms.mode remote (the gateway side) and kms_node (a node): pairs together, URIs well formed."""
    k = cfg.kms
    for i, addr in enumerate(k.endpoints):
        parse_listen(addr, ld, f"kms.endpoints[{i}]")
    if k.mode == "remote":
        if not k.endpoints:
            ld.fail("kms.endpoints", 'expected at least one HOST:PORT when mode is "remote"')
        for name in ("client_cert_file", "client_key_file", "ca_file"):
            if getattr(k, name) is None:
                ld.fail(f"kms.{name}", 'expected a file when mode is "remote"')
    if (k.client_ecdsa_cert_file is None) != (k.client_ecdsa_key_file is None):
        ld.fail("kms.client_ecdsa_cert_file",
                "expected client_ecdsa_cert_file and client_ecdsa_key_file together")
    n = cfg.kms_node
    for i, addr in enumerate(n.listen):
        parse_listen(addr, ld, f"kms_node.listen[{i}]")
    if (n.cert_file is None) != (n.key_file is None):
        ld.fail("kms_node.cert_file", "expected cert_file and key_file together")
    if (n.ecdsa_cert_file is None) != (n.ecdsa_key_file is None):
        ld.fail("kms_node.ecdsa_cert_file", "expected ecdsa_cert_file and ecdsa_key_file together")
    for path, uri in (("kms.server_uri", k.server_uri), ("kms_node.client_uri", n.client_uri)):
        if not _URI.fullmatch(uri):
            ld.fail(path, f"expected a URI such as spiffe://qpher.internal/kms, got {_show(uri)}")


_URI = re.compile(r"[a-z][a-z0-9+.-]*://[!-~]+")
_ROLE_PREFIX_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


def _check_scale_out(cfg: Config, ld: _Loader) -> None:
    """storage.* and ratelimit.*: a DSN or URL is never shown (it may hold a password)."""
    st = cfg.storage
    for name in ("dsn", "gateway_dsn", "kms_dsn"):
        dsn = getattr(st, name)
        if dsn is not None and not (dsn.startswith("postgresql://") or dsn.startswith("postgres://")):
            ld.fail(f"storage.{name}",
                    "expected a postgresql:// URL (value not shown: it may hold a password)")
    if st.backend == "postgresql":
        if st.dsn is None and (st.gateway_dsn is None or st.kms_dsn is None):
            ld.fail("storage.dsn",
                    'expected a DSN (or both gateway_dsn and kms_dsn) when backend is "postgresql"')
    prefix = st.role_prefix
    if not (1 <= len(prefix) <= 40 and prefix[0].isalpha() and set(prefix) <= _ROLE_PREFIX_CHARS):
        ld.fail("storage.role_prefix",
                f"expected 1..40 characters a-z, 0-9, _ starting with a letter, got {_show(prefix)}")
    rl = cfg.ratelimit
    url = rl.redis_url
    if url is not None and not url.startswith(("redis://", "unix://")):
        ld.fail("ratelimit.redis_url", "expected a redis:// or unix:// URL (value not shown)")
    if rl.backend == "redis" and url is None:
        ld.fail("ratelimit.redis_url", 'expected a URL when backend is "redis"')


def parse_listen(addr: str, ld: _Loader | None = None, path: str = "listen") -> tuple[str, int]:
    """``"127.0.0.1:8443"`` / ``"[::1]:8443"`` -> (host, port)."""
    host, sep, port_s = addr.rpartition(":")
    host = host.strip("[]")
    ok = bool(sep and host and port_s.isdigit() and 0 <= int(port_s) <= 65535)
    if not ok:
        if ld is None:
            raise ConfigError(f"{path}: expected HOST:PORT, got {_show(addr)}")
        ld.fail(path, f"expected HOST:PORT, got {_show(addr)}")
    return host, int(port_s)


def load_config(path: str | os.PathLike[str], *, check_files: bool = True) -> Config:
    """Load and validate ``path``; raises :class:`ConfigError` with a one-line message.
    ``check_files=False`` validates everything but the existence of the files it names."""
    p = Path(path)
    source = p.name
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config file ({type(exc).__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "?"
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}: {where}: {problem}") from None
    ld = _Loader(source, p.resolve().parent, check_files)
    cfg: Config = ld.build(Config, data, "")
    _check(cfg, ld)
    return cfg


def config_from_dict(data: dict[str, Any], base_dir: str | os.PathLike[str], source: str = "config", *,
                     check_files: bool = True) -> Config:
    """Build a config from an in-memory mapping (tests, ``init``) with the same strictness."""
    ld = _Loader(source, Path(base_dir).resolve(), check_files)
    cfg: Config = ld.build(Config, data, "")
    _check(cfg, ld)
    return cfg
