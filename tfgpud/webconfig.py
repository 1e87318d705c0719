"""``[http] web_config_file``: TLS and basic auth in the exporter-toolkit ``web-config.yml`` format.

The file node_exporter users know (``tls_server_config``, ``http_server_config``,
``basic_auth_users`` with bcrypt hashes), so ``promtool check web-config`` accepts what tfgpud
accepts. :func:`load_web_config` validates it (raising :class:`WebConfigError`, a
:class:`~tfgpud.config.ConfigError`); :class:`WebSecurity` is the runtime object the HTTP
server asks, per connection, for the TLS context and, per request, whether the credentials are
good. Like exporter-toolkit it re-reads the web config, certificate, key and client CA when
their files change, so a renewed certificate needs no restart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import bcrypt
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tfgpud.config import (
    NESTED_TOO_DEEPLY,
    ConfigError,
    check_header_field,
    read_bounded_text,
)
from tfgpud.listing import file_stamp

log = logging.getLogger(__name__)

# exporter-toolkit's names → what Python's ssl module can do.
_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_VERIFY_MODES = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# Response headers exporter-toolkit lets a web config set.
_ALLOWED_HEADERS = frozenset(
    {
        "Strict-Transport-Security",
        "X-Content-Type-Options",
        "X-Frame-Options",
        "X-XSS-Protection",
        "Content-Security-Policy",
    }
)
_BCRYPT_HASH = re.compile(r"^\$2[abxy]?\$\d\d\$[./A-Za-z0-9]{53}$")
# Compared against when the user is unknown, so a wrong user name costs what a wrong password does.
_DUMMY_HASH = b"$2b$10$8SspfQRPqp6.mNSsfOXVtOpEIa5AFJqqmoh4Q5Pshlm1SIiS52gWC"
_CACHE_LIMIT = 1024
_RECHECK_SECONDS = 1.0  # how often, at most, the files are stat()ed for changes


class WebConfigError(ConfigError):
    """The web config file is unreadable or invalid; ``problems`` has one line per problem."""

    def render(self) -> str:
        head = (
            f"invalid web configuration {self.path} ([http] web_config_file; the "
            "exporter-toolkit web-config.yml format, see `promtool check web-config`):"
        )
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsServerConfig(_Model):
    cert_file: str | None = None
    key_file: str | None = None
    client_auth_type: Literal[
        "NoClientCert",
        "RequestClientCert",
        "RequireAnyClientCert",
        "VerifyClientCertIfGiven",
        "RequireAndVerifyClientCert",
    ] = "NoClientCert"
    client_ca_file: str | None = None
    client_allowed_sans: list[str] | None = None
    min_version: Literal["TLS10", "TLS11", "TLS12", "TLS13"] = "TLS12"
    max_version: Literal["TLS10", "TLS11", "TLS12", "TLS13"] = "TLS13"
    prefer_server_cipher_suites: bool = True  # Python's server contexts always do
    # Valid for exporter-toolkit, refused here with a reason (see _unsupported).
    cert: Any = None
    key: Any = None
    client_ca: Any = None
    cipher_suites: Any = None
    curve_preferences: Any = None


class HttpServerConfig(_Model):
    http2: bool = True  # accepted for compatibility; tfgpud speaks HTTP/1.1
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("headers")
    @classmethod
    def _allowed(cls, value: dict[str, str]) -> dict[str, str]:
        bad = sorted(set(value) - _ALLOWED_HEADERS)
        if bad:
            allowed = ", ".join(sorted(_ALLOWED_HEADERS))
            raise ValueError(f"header(s) {', '.join(bad)} may not be set; allowed: {allowed}")
        for name, text in value.items():
            check_header_field(name, text)
        return value


class WebConfigFile(_Model):
    tls_server_config: TlsServerConfig = Field(default_factory=TlsServerConfig)
    http_server_config: HttpServerConfig = Field(default_factory=HttpServerConfig)
    basic_auth_users: dict[str, str] = Field(default_factory=dict)
    rate_limit: Any = None


_UNSUPPORTED = {
    ("tls_server_config", "cert"): "inline certificates are not supported; use cert_file",
    ("tls_server_config", "key"): "inline keys are not supported; use key_file",
    ("tls_server_config", "client_ca"): "inline CAs are not supported; use client_ca_file",
    ("tls_server_config", "cipher_suites"): (
        "not supported: Python's ssl picks the secure TLS 1.2 suites itself (TLS 1.3 suites "
        "are never configurable); remove the key or raise min_version to TLS13"
    ),
    ("tls_server_config", "curve_preferences"): "not supported; remove the key",
    ("rate_limit",): "not supported by tfgpud; remove the key",
}


@dataclass(frozen=True)
class TlsSettings:
    """A validated ``tls_server_config`` with paths resolved against the web config's directory."""

    cert_file: str
    key_file: str
    client_ca_file: str | None
    verify_mode: ssl.VerifyMode
    min_version: ssl.TLSVersion
    max_version: ssl.TLSVersion
    allowed_sans: frozenset[str] | None

    def files(self) -> tuple[str, ...]:
        return tuple(f for f in (self.cert_file, self.key_file, self.client_ca_file) if f)


@dataclass(frozen=True)
class WebConfig:
    """What a web config file says, validated."""

    path: str
    tls: TlsSettings | None
    users: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


def _loc(loc: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _resolve(base: Path, value: str | None) -> str | None:
    if not value:
        return None
    return value if os.path.isabs(value) else os.path.normpath(base / value)


def parse_web_config(text: str, path: str) -> WebConfig:
    """Validate web config ``text`` (read from ``path``). Does not read the files it names."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise WebConfigError(path, [f"YAML syntax error: {exc}"]) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise WebConfigError(path, [NESTED_TOO_DEEPLY]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise WebConfigError(path, [f"expected a mapping at the top, got {type(data).__name__}"])
    try:
        model = WebConfigFile.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = _loc(tuple(err["loc"]))
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key `{loc}`")
            else:
                problems.append(f"`{loc}`: {err['msg']}")
        raise WebConfigError(path, problems) from None
    problems = []
    tls_raw = data.get("tls_server_config") or {}
    for keys, why in _UNSUPPORTED.items():
        node: Any = data
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if node is not None:
            problems.append(f"`{'.'.join(keys)}`: {why}")
    tls = _tls_settings(model.tls_server_config, Path(path).parent, problems, bool(tls_raw))
    users: dict[str, bytes] = {}
    for user, hashed in model.basic_auth_users.items():
        if not _BCRYPT_HASH.match(hashed or ""):
            problems.append(
                f"`basic_auth_users.{user}`: not a bcrypt hash (expected $2y$10$...; make one "
                "with `htpasswd -nBC 10 '' | tr -d ':'`)"
            )
        users[user] = hashed.encode()
    if problems:
        raise WebConfigError(path, problems)
    return WebConfig(
        path=path,
        tls=tls,
        users=MappingProxyType(users),
        headers=MappingProxyType(dict(model.http_server_config.headers)),
    )


def _tls_settings(
    cfg: TlsServerConfig, base: Path, problems: list[str], present: bool
) -> TlsSettings | None:
    cert, key = _resolve(base, cfg.cert_file), _resolve(base, cfg.key_file)
    ca = _resolve(base, cfg.client_ca_file)
    if cert is None and key is None:
        if present and (ca or cfg.client_auth_type != "NoClientCert"):
            problems.append("`tls_server_config`: client settings without cert_file and key_file")
        return None  # exporter-toolkit: no certificate means plain HTTP
    if cert is None:
        problems.append("`tls_server_config.cert_file`: missing (key_file is set)")
    if key is None:
        problems.append("`tls_server_config.key_file`: missing (cert_file is set)")
    auth = cfg.client_auth_type
    if auth in ("RequestClientCert", "RequireAnyClientCert"):
        problems.append(
            f"`tls_server_config.client_auth_type`: {auth} accepts client certificates without "
            "verifying them, which tfgpud does not do; use RequireAndVerifyClientCert (or "
            "VerifyClientCertIfGiven) with client_ca_file"
        )
    elif auth != "NoClientCert" and ca is None:
        problems.append(f"`tls_server_config.client_ca_file`: required by {auth}")
    elif auth == "NoClientCert" and ca is not None:
        problems.append(
            "`tls_server_config.client_ca_file` is set but client_auth_type is NoClientCert; "
            "set client_auth_type: RequireAndVerifyClientCert"
        )
    if cfg.client_allowed_sans and auth not in (
        "VerifyClientCertIfGiven",
        "RequireAndVerifyClientCert",
    ):
        problems.append("`tls_server_config.client_allowed_sans` needs verified client certs")
    lo, hi = _TLS_VERSIONS[cfg.min_version], _TLS_VERSIONS[cfg.max_version]
    if lo > hi:
        problems.append("`tls_server_config.min_version` is above max_version")
    if cert is None or key is None:
        return None
    return TlsSettings(
        cert_file=cert,
        key_file=key,
        client_ca_file=ca,
        verify_mode=_VERIFY_MODES.get(auth, ssl.CERT_REQUIRED),
        min_version=lo,
        max_version=hi,
        allowed_sans=frozenset(cfg.client_allowed_sans) if cfg.client_allowed_sans else None,
    )


def ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """A server context for ``tls``; raises OSError/ssl.SSLError when a file is bad."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = tls.min_version
    ctx.maximum_version = tls.max_version
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file is not None:
        ctx.load_verify_locations(cafile=tls.client_ca_file)
    ctx.verify_mode = tls.verify_mode
    return ctx


def _context_or_error(web: WebConfig) -> ssl.SSLContext | None:
    if web.tls is None:
        return None
    try:
        return ssl_context(web.tls)
    except (OSError, ssl.SSLError, ValueError) as exc:
        files = ", ".join(web.tls.files())
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise WebConfigError(
            web.path,
            [
                f"cannot load the TLS certificate/key/CA ({files}): {reason}. The files must "
                "be PEM, readable by tfgpud's user, and the key must match the certificate"
            ],
        ) from None


def load_web_config(path: str | Path) -> WebConfig:
    """Read, validate, and check that the TLS files load; raise WebConfigError otherwise."""
    p = str(path)
    try:
        text = read_bounded_text(Path(p))
    except ConfigError as exc:
        raise WebConfigError(p, exc.problems) from None
    web = parse_web_config(text, p)
    _context_or_error(web)
    return web


# Per watched file: its file_stamp (inode, mtime, size), None when it cannot be stat()ed.
Stamp = tuple[tuple[int, int, int] | None, ...]


def _watch_list(web: WebConfig) -> tuple[str, ...]:
    return (web.path, *(web.tls.files() if web.tls else ()))


def _load_stamped(path: str) -> tuple[WebConfig, Stamp]:
    """Load the web config file, with the stamps of it and of the TLS files it names taken
    before they are read (the TLS files are read after this returns, by the context): a file
    rewritten while it is loaded differs from its stamp at the next check, so it is re-read."""
    first = _mtimes((path,))
    web = load_web_config(path)
    return web, first + _mtimes(_watch_list(web)[1:])


def _mtimes(paths: tuple[str, ...]) -> Stamp:
    return tuple(file_stamp(p) for p in paths)


def peer_sans(cert: Mapping[str, Any] | None) -> set[str]:
    """The subjectAltName values of a peer certificate from ``SSLSocket.getpeercert()``."""
    if not cert:
        return set()
    return {str(value) for _, value in cert.get("subjectAltName", ())}


class WebSecurity:
    """TLS context and basic-auth checks for the HTTP server; safe to call from any thread.

    Whether TLS is on is fixed at construction (a restart changes it); certificates, keys,
    CAs, users and headers are re-read when their files change. A changed file that is invalid
    is logged and the last good configuration kept.
    """

    def __init__(self, web: WebConfig, *, stamp: Stamp | None = None) -> None:
        """``stamp``: the watched files' stamps from before they were read (``from_file``);
        None stamps them now, before the TLS files are read."""
        self._lock = threading.Lock()
        self._bcrypt_lock = threading.Lock()
        self._web = web
        self._watched = _watch_list(web)
        self._stamp = _mtimes(self._watched) if stamp is None else stamp
        self._ctx = _context_or_error(web)
        self.tls_enabled = web.tls is not None
        self._checked = time.monotonic()
        self._loading = False  # a re-read is under way (on some request's thread)
        self._ok: set[tuple[str, bytes, bytes]] = set()

    @classmethod
    def from_file(cls, path: str | Path) -> WebSecurity:
        web, stamp = _load_stamped(str(path))
        return cls(web, stamp=stamp)

    def _refresh(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._checked < _RECHECK_SECONDS:
                return
            if self._loading:
                return  # one re-read at a time: an older one must not land after a newer one
            self._checked = now
            stamp = _mtimes(self._watched)
            if stamp == self._stamp:
                return
            self._stamp = stamp  # an invalid file is not re-read until it changes again
            self._loading = True
        try:
            self._reread()
        finally:
            with self._lock:
                self._loading = False

    def _reread(self) -> None:
        try:
            web, stamp = _load_stamped(self._web.path)
            ctx = _context_or_error(web)
        except WebConfigError as exc:
            log.error("web config changed but is invalid; keeping the previous one. %s", exc)
            return
        if (web.tls is not None) != self.tls_enabled:
            log.warning("web config: turning TLS on or off takes effect on restart")
            if self.tls_enabled:
                return  # keep serving TLS with the old context rather than none
            ctx = None
        with self._lock:
            self._web, self._ctx = web, ctx
            self._watched = _watch_list(web)
            # Stamped before reading: a write while loading is a change at the next check.
            self._stamp = stamp
            self._ok.clear()
        log.info("web config %s re-read", web.path)

    @property
    def config(self) -> WebConfig:
        return self._web

    def context(self) -> ssl.SSLContext | None:
        """The current server SSL context (None when TLS is off)."""
        self._refresh()
        return self._ctx

    @property
    def auth_required(self) -> bool:
        return bool(self._web.users)

    @property
    def headers(self) -> Mapping[str, str]:
        return self._web.headers

    def san_allowed(self, cert: Mapping[str, Any] | None) -> bool:
        tls = self._web.tls
        if tls is None or tls.allowed_sans is None:
            return True
        return bool(peer_sans(cert) & tls.allowed_sans)

    def _credentials(
        self, authorization: str | None
    ) -> tuple[str, str, tuple[str, bytes, bytes]] | None:
        """(user, password, remembered-check key) from a Basic ``Authorization``; None if bad."""
        if not authorization or authorization[:6].lower() != "basic ":
            return None
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        if not sep:
            return None
        hashed = self._web.users.get(user) or b""
        return user, password, (user, hashlib.sha256(password.encode()).digest(), hashed)

    def cached_verdict(self, authorization: str | None) -> bool | None:
        """What :meth:`authenticate` would answer, when that needs no bcrypt: True without
        users or for remembered credentials, False for a malformed header; None otherwise."""
        self._refresh()
        if not self._web.users:
            return True
        creds = self._credentials(authorization)
        if creds is None:
            return False
        key = creds[2]
        known_user = bool(key[2])
        return True if known_user and key in self._ok else None

    def authenticate(self, authorization: str | None) -> bool:
        """True when no users are configured or the Basic credentials match one.

        bcrypt is slow by design (~50 ms at cost 10), so successful checks are remembered by
        (user, sha256(password), hash): a scrape every few seconds costs one hash lookup.
        """
        quick = self.cached_verdict(authorization)
        if quick is not None:
            return quick
        creds = self._credentials(authorization)
        if creds is None:
            return False
        user, password, key = creds
        hashed = self._web.users.get(user)
        with self._bcrypt_lock:  # one bcrypt at a time: wrong passwords cannot eat every core
            try:
                ok = bcrypt.checkpw(password.encode(), hashed or _DUMMY_HASH)
            except ValueError:
                ok = False
        ok = ok and hashed is not None
        if ok:
            with self._lock:
                if len(self._ok) >= _CACHE_LIMIT:
                    self._ok.clear()
                self._ok.add(key)
        return ok
