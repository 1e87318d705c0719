"""The command line as a person meets it: usage errors, help, --url, --json on failure, colour,
exit codes."""

from __future__ import annotations

import argparse
import json
import os
import pty
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO_ROOT

from tfgpud.cli import EX_CONFIG, EX_FAILURE, EX_USAGE, build_parser, daemon_url, main

STATUS = {
    "host": "gpu1",
    "version": "0.1.0",
    "summary": "2 GPUs, driver 550.54.15",
    "verdict": {"state": "critical", "sentence": "GPU 1 (NVIDIA H100) is lost"},
    "gpus": [{"index": 1, "uuid": "GPU-1", "name": "NVIDIA H100", "state": "lost", "lost": True}],
    "tensorflow": [],
    "findings": [
        {
            "code": "gpu-lost",
            "severity": "critical",
            "subject": "GPU-1",
            "summary": "GPU 1 is lost",
            "evidence": ["NVML: GPU_IS_LOST"],
            "fix": "Reboot.",
        }
    ],
}


@pytest.fixture
def daemon() -> Iterator[str]:
    """A loopback server that answers /status like the daemon; yields its HOST:PORT."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(STATUS).encode()
            self.send_response(200 if self.path == "/status" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- --url ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("localhost:10041", "http://localhost:10041"),
        ("127.0.0.1:9000/", "http://127.0.0.1:9000"),
        ("[::1]:10041", "http://[::1]:10041"),
        ("gpu1", "http://gpu1:10041"),
        ("https://gpu1.example:10041", "https://gpu1.example:10041"),
        ("http://gpu1/tfgpud/", "http://gpu1/tfgpud"),
    ],
)
def test_url_accepts_host_port_and_urls(given: str, url: str) -> None:
    assert daemon_url(given) == url


@pytest.mark.parametrize("bad", ["ftp://gpu1", "localhost:notaport", "http://", ":10041"])
def test_a_bad_url_is_a_usage_error(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--url", bad]) == EX_USAGE
    err = capsys.readouterr().err
    assert err.startswith("usage: tfgpud status") and "argument --url" in err


def test_status_url_host_port_reaches_the_daemon(
    daemon: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--url", daemon]) == 0
    out = capsys.readouterr().out
    assert out.startswith("CRITICAL  GPU 1 (NVIDIA H100) is lost")
    assert "\x1b[" not in out  # not a terminal: no colour


# --- --json on every outcome ----------------------------------------------------------------------


def test_status_json_prints_the_document(daemon: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--url", daemon, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == STATUS


def test_status_json_with_the_daemon_down_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"127.0.0.1:{closed_port()}"
    assert main(["status", "--url", url, "--json"]) == EX_FAILURE
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["ok"] is False and doc["exit_code"] == EX_FAILURE
    assert doc["url"] == f"http://{url}" and "Connection refused" in doc["error"]
    assert "Is the daemon running" in captured.err  # and for a person, on stderr


def test_status_json_usage_error_is_json_too(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--json", "--bogus"]) == EX_USAGE
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {
        "ok": False,
        "exit_code": EX_USAGE,
        "error": "tfgpud status: error: unrecognized arguments: --bogus",
    }


def test_doctor_json_with_a_bad_config_prints_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nstat_dir = '/x'\n")
    assert main(["doctor", "--config", str(bad), "--json"]) == EX_CONFIG
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and "did you mean `state_dir`" in doc["error"]


# --- usage errors name the subcommand; every option has help --------------------------------------


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["status", "--bogus"], "usage: tfgpud status "),
        (["doctor", "--bogus"], "usage: tfgpud doctor "),
        (["check-config"], "usage: tfgpud check-config "),
        (["baseline", "forget"], "usage: tfgpud baseline forget "),
        (["baseline", "show", "--bogus"], "usage: tfgpud baseline show "),
        (["bogus"], "usage: tfgpud "),
    ],
)
def test_usage_errors_print_the_subcommands_usage(
    argv: list[str], usage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == EX_USAGE
    err = capsys.readouterr().err
    assert err.startswith(usage), err
    assert "tfgpud: error:" not in err or argv == ["bogus"]


def _actions(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)
        else:
            yield parser.prog, action


def test_every_option_and_argument_has_help() -> None:
    missing = [
        f"{prog} {a.option_strings or a.dest}"
        for prog, a in _actions(build_parser())
        if not a.help or a.help == argparse.SUPPRESS
    ]
    assert missing == []


def test_help_and_readme_document_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for code in ("0", "1", "2", "64", "78"):
        assert f"\n  {code} " in out
    readme = (REPO_ROOT / "README.md").read_text()
    assert "| 64 |" in readme and "| 78 |" in readme


# --- colour: a terminal, not NO_COLOR, never a pipe or JSON ---------------------------------------


def _on_a_terminal(argv: list[str], env: dict[str, str]) -> str:
    """Run ``tfgpud ARGV`` with stdout on a pseudo-terminal; what it wrote there."""
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tfgpud", *argv],
        stdout=child_fd,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    os.close(child_fd)
    chunks: list[bytes] = []
    try:
        while True:
            ready, _, _ = select.select([main_fd], [], [], 30)
            if not ready:
                break
            try:
                data = os.read(main_fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(main_fd)
        proc.wait(30)
    return b"".join(chunks).decode()


def test_colour_on_a_terminal_unless_no_color(daemon: str) -> None:
    base = {"TERM": "xterm", "NO_COLOR": ""}
    coloured = _on_a_terminal(["status", "--url", daemon], base)
    assert "\x1b[1;31mCRITICAL\x1b[0m" in coloured and "\x1b[1;31m[critical]\x1b[0m" in coloured
    plain = _on_a_terminal(["status", "--url", daemon], {**base, "NO_COLOR": "1"})
    assert "CRITICAL" in plain and "\x1b[" not in plain
    as_json = _on_a_terminal(["status", "--url", daemon, "--json"], base)
    assert "\x1b[" not in as_json and json.loads(as_json)["host"] == "gpu1"
    dumb = _on_a_terminal(["status", "--url", daemon], {**base, "TERM": "dumb"})
    assert "\x1b[" not in dumb


def test_errors_are_printable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[daemon]\n"evil\\u001b]0;pwned\\u0007" = 1\n')
    assert main(["check-config", str(bad)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b]0;pwned" in err
