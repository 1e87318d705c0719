"""Test PKI and web configs: a CA, a server certificate for 127.0.0.1, a client certificate.

Made with the `openssl` command line (Debian's), so the files are what an admin would have.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import bcrypt


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca_crt: Path
    server_crt: Path
    server_key: Path
    client_crt: Path
    client_key: Path
    other_crt: Path  # signed by another CA: must be refused
    other_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-days", "2", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _leaf(d: Path, name: str, ca: str, san: str, usage: str) -> None:
    ext = d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr",
        cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", ext.name,
        cwd=d,
    )  # fmt: skip


def make_pki(d: Path) -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    _ca(d, "ca")
    _ca(d, "otherca")
    _leaf(d, "server", "ca", "IP:127.0.0.1,DNS:localhost", "serverAuth")
    _leaf(d, "client", "ca", "DNS:prometheus.example", "clientAuth")
    _leaf(d, "other", "otherca", "DNS:prometheus.example", "clientAuth")
    return Pki(
        dir=d,
        ca_crt=d / "ca.crt",
        server_crt=d / "server.crt",
        server_key=d / "server.key",
        client_crt=d / "client.crt",
        client_key=d / "client.key",
        other_crt=d / "other.crt",
        other_key=d / "other.key",
    )


def bcrypt_hash(password: str, rounds: int = 10) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()


def web_config_yaml(
    pki: Pki | None,
    users: dict[str, str] | None = None,
    *,
    client_auth: str | None = None,
    extra_tls: str = "",
) -> str:
    """A web-config.yml text: TLS with ``pki`` (None: plain HTTP), users → bcrypt hashes."""
    lines: list[str] = []
    if pki is not None:
        lines += [
            "tls_server_config:",
            f"  cert_file: {pki.server_crt}",
            f"  key_file: {pki.server_key}",
        ]
        if client_auth:
            lines += [f"  client_auth_type: {client_auth}", f"  client_ca_file: {pki.ca_crt}"]
        lines += [f"  {line}" for line in extra_tls.splitlines() if line]
    if users:
        lines.append("basic_auth_users:")
        lines += [f"  {u}: '{h}'" for u, h in users.items()]
    return "\n".join(lines) + "\n"
