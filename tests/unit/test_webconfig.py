from __future__ import annotations

import base64
import ssl
from pathlib import Path

import pytest
from tlsutil import Pki, bcrypt_hash, make_pki, web_config_yaml

from tfgpud.cli import EX_CONFIG, main
from tfgpud.webconfig import (
    WebConfigError,
    WebSecurity,
    load_web_config,
    parse_web_config,
    peer_sans,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _problems(text: str) -> str:
    with pytest.raises(WebConfigError) as info:
        parse_web_config(text, "/etc/tfgpud/web-config.yml")
    return "\n".join(info.value.problems)


def test_empty_file_means_plain_http_without_auth() -> None:
    web = parse_web_config("", "/x/web.yml")
    assert web.tls is None and not web.users


def test_relative_tls_paths_resolve_against_the_web_config_directory() -> None:
    web = parse_web_config(
        "tls_server_config:\n  cert_file: tls/c.pem\n  key_file: /abs/k.pem\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n"
        "  min_version: TLS13\n",
        "/etc/tfgpud/web-config.yml",
    )
    assert web.tls is not None
    assert web.tls.cert_file == "/etc/tfgpud/tls/c.pem"
    assert web.tls.key_file == "/abs/k.pem"
    assert web.tls.client_ca_file == "/etc/tfgpud/ca.pem"
    assert web.tls.verify_mode is ssl.CERT_REQUIRED
    assert web.tls.min_version is ssl.TLSVersion.TLSv1_3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tls_server_config: {cert_file: c.pem}", "key_file`: missing"),
        ("tls_server_config: {key_file: k.pem}", "cert_file`: missing"),
        ("tls_server_config: {certfile: c.pem}", "unknown key `tls_server_config.certfile`"),
        ("basic_auth_user: {a: b}", "unknown key `basic_auth_user`"),
        ("basic_auth_users: {alice: plaintext}", "`basic_auth_users.alice`: not a bcrypt hash"),
        (
            "tls_server_config: {cert_file: c, key_file: k, client_auth_type: RequestClientCert}",
            "without verifying them",
        ),
        (
            "tls_server_config: {cert_file: c, key_file: k, "
            "client_auth_type: RequireAndVerifyClientCert}",
            "client_ca_file`: required by RequireAndVerifyClientCert",
        ),
        (
            "tls_server_config: {cert_file: c, key_file: k, client_ca_file: ca}",
            "client_auth_type is NoClientCert",
        ),
        ("tls_server_config: {cert_file: c, key_file: k, min_version: TLS9}", "min_version"),
        (
            "tls_server_config: {cert_file: c, key_file: k, min_version: TLS13, "
            "max_version: TLS12}",
            "above max_version",
        ),
        ("tls_server_config: {cert_file: c, key_file: k, cipher_suites: [X]}", "cipher_suites"),
        ("http_server_config: {headers: {Server: x}}", "may not be set"),
        ("tls_server_config: [", "YAML syntax error"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_invalid_web_configs_name_the_key_and_the_fix(text: str, expected: str) -> None:
    assert expected in _problems(text)


def test_tls_files_are_loaded_at_validation(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "web.yml"
    path.write_text(
        f"tls_server_config:\n  cert_file: {pki.server_crt}\n  key_file: {pki.client_key}\n"
    )
    with pytest.raises(WebConfigError, match="key must match the certificate"):
        load_web_config(path)
    path.write_text(f"tls_server_config:\n  cert_file: nope.crt\n  key_file: {pki.server_key}\n")
    with pytest.raises(WebConfigError, match="No such file"):
        load_web_config(path)
    with pytest.raises(WebConfigError, match="cannot read"):
        load_web_config(tmp_path / "missing.yml")


def test_check_config_and_run_exit_78_on_a_bad_web_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    web = tmp_path / "web-config.yml"
    web.write_text("basic_auth_users:\n  alice: not-a-hash\n")
    cfg = tmp_path / "tfgpud.toml"
    cfg.write_text('[http]\nweb_config_file = "web-config.yml"\n')
    assert main(["check-config", str(cfg)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert f"invalid web configuration {web}" in err
    assert "basic_auth_users.alice`: not a bcrypt hash" in err
    assert "Traceback" not in err
    assert main(["run", "--config", str(cfg)]) == EX_CONFIG
    assert "not a bcrypt hash" in capsys.readouterr().err

    web.write_text(f"basic_auth_users:\n  alice: '{bcrypt_hash('pw', rounds=4)}'\n")
    assert main(["check-config", str(cfg)]) == 0


def test_authenticate_checks_bcrypt_and_caches_only_successes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tfgpud.webconfig as webconfig

    path = tmp_path / "web.yml"
    path.write_text(web_config_yaml(None, {"alice": bcrypt_hash("pw", rounds=4)}))
    sec = WebSecurity.from_file(path)
    calls: list[bytes] = []
    real = webconfig.bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(password)
        return real(password, hashed)

    monkeypatch.setattr(webconfig.bcrypt, "checkpw", counting)
    assert sec.auth_required
    assert sec.authenticate(_basic("alice", "pw"))
    assert sec.authenticate(_basic("alice", "pw"))
    assert calls == [b"pw"]  # the second success came from the cache
    assert not sec.authenticate(_basic("alice", "wrong"))
    assert not sec.authenticate(_basic("alice", "wrong"))
    assert calls == [b"pw", b"wrong", b"wrong"]  # failures are never cached
    assert not sec.authenticate(_basic("mallory", "pw"))  # unknown user: still one bcrypt
    assert len(calls) == 4
    for bad in (
        None,
        "",
        "Bearer x",
        "Basic !!!",
        "Basic " + base64.b64encode(b"nocolon").decode(),
    ):
        assert not sec.authenticate(bad)
    assert len(calls) == 4


def test_no_users_means_no_auth(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text("")
    sec = WebSecurity.from_file(path)
    assert not sec.auth_required and sec.authenticate(None)
    assert sec.context() is None and not sec.tls_enabled


def test_changed_users_apply_and_invalid_changes_are_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tfgpud.webconfig as webconfig

    monkeypatch.setattr(webconfig, "_RECHECK_SECONDS", 0.0)
    path = tmp_path / "web.yml"
    path.write_text(web_config_yaml(None, {"alice": bcrypt_hash("one", rounds=4)}))
    sec = WebSecurity.from_file(path)
    assert sec.authenticate(_basic("alice", "one"))
    path.write_text(web_config_yaml(None, {"alice": bcrypt_hash("two", rounds=4)}) + "\n")
    assert not sec.authenticate(_basic("alice", "one"))  # cache cleared with the old hash
    assert sec.authenticate(_basic("alice", "two"))
    path.write_text("basic_auth_users: [broken\n")
    assert sec.authenticate(_basic("alice", "two"))  # the last good config is kept


def test_peer_sans() -> None:
    cert = {"subjectAltName": (("DNS", "a.example"), ("IP Address", "10.0.0.1"))}
    assert peer_sans(cert) == {"a.example", "10.0.0.1"}
    assert peer_sans(None) == set()


def test_nested_or_huge_web_configs_are_errors_not_crashes(tmp_path: Path) -> None:
    assert "nested too deeply" in _problems("rate_limit: " + "[" * 2000 + "]" * 2000 + "\n")
    huge = tmp_path / "web.yml"
    huge.write_text("# padding\n" * 200_000)
    with pytest.raises(WebConfigError, match="larger than 1024 KiB"):
        load_web_config(huge)


def test_response_headers_must_be_sendable() -> None:
    text = 'http_server_config:\n  headers:\n    X-Frame-Options: "deny\\r\\nSet-Cookie: x"\n'
    assert "control character" in _problems(text)


def test_cached_verdict_needs_bcrypt_only_for_unverified_credentials(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text(web_config_yaml(None, {"alice": bcrypt_hash("pw")}))
    sec = WebSecurity.from_file(path)
    good = _basic("alice", "pw")
    assert sec.cached_verdict(None) is False
    assert sec.cached_verdict("Basic !!!") is False
    assert sec.cached_verdict(good) is None  # not verified yet: bcrypt needed
    assert sec.cached_verdict(_basic("mallory", "pw")) is None  # unknown users cost bcrypt too
    assert sec.authenticate(good)
    assert sec.cached_verdict(good) is True
    assert sec.cached_verdict(_basic("alice", "other")) is None


def test_a_write_while_the_file_is_loaded_is_read_at_the_next_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bob removed while a reload (for carol) is reading the file: the next check re-reads it
    (the files were stamped after loading, so bob kept access until some later change)."""
    import tfgpud.webconfig as webconfig

    monkeypatch.setattr(webconfig, "_RECHECK_SECONDS", 0.0)
    path = tmp_path / "web.yml"
    users = {"alice": bcrypt_hash("a", rounds=4), "bob": bcrypt_hash("b", rounds=4)}
    path.write_text(web_config_yaml(None, users))
    sec = WebSecurity.from_file(path)
    assert sec.authenticate(_basic("bob", "b"))
    load = webconfig.load_web_config

    def load_then_edit(p: str | Path) -> webconfig.WebConfig:
        web = load(p)
        monkeypatch.setattr(webconfig, "load_web_config", load)  # one edit only
        path.write_text(web_config_yaml(None, {"alice": users["alice"]}))  # bob removed
        return web

    monkeypatch.setattr(webconfig, "load_web_config", load_then_edit)
    path.write_text(web_config_yaml(None, {**users, "carol": bcrypt_hash("c", rounds=4)}))
    assert sec.authenticate(_basic("carol", "c"))  # this check's reload read carol's version
    assert not sec.authenticate(_basic("bob", "b"))  # the next check reads bob's removal
    assert sec.authenticate(_basic("alice", "a"))
