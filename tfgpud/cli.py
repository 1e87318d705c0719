"""Command line: ``tfgpud run | doctor | status | check-config | reload | baseline | version``.

Exit codes: 0 ok; doctor 1 warnings / 2 critical; 1 runtime failure (e.g. port in use,
daemon unreachable); 64 usage; 78 invalid configuration (EX_CONFIG). Errors are one paragraph
for a person, never a traceback.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import logging
import os
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tfgpud import __version__
from tfgpud.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_LISTEN,
    Config,
    ConfigError,
    load_config,
    parse_listen,
)
from tfgpud.model import to_jsonable
from tfgpud.views import render_status_text

EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 64
EX_CONFIG = 78


def _load(path: str | None) -> tuple[Config, str | None]:
    """The configuration to use: the file named, else the default file, else built-in defaults."""
    if path is not None:
        return load_config(path), path
    if DEFAULT_CONFIG_PATH.exists():
        return load_config(DEFAULT_CONFIG_PATH), str(DEFAULT_CONFIG_PATH)
    return Config(), None


def _check_web_config(config: Config) -> None:
    """Validate ``[http] web_config_file`` (and that its TLS files load); raise ConfigError."""
    if config.http.web_config_file:
        from tfgpud.webconfig import load_web_config

        load_web_config(config.http.web_config_file)


def _err(message: str) -> None:
    print(f"tfgpud: {message}", file=sys.stderr)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        _check_web_config(load_config(args.path))
    except ConfigError as exc:
        _err(exc.render())
        return EX_CONFIG
    print(f"{args.path}: valid")
    return EX_OK


def _daemon_config_path(pid: int) -> Path | None:
    """The file the ``tfgpud run`` process ``pid`` re-reads on SIGHUP (its ``--config``, else
    the default); None if ``pid`` is not ``tfgpud run``.

    Raises OSError when its command line cannot be read (no such process, no access)."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    argv = [a.decode(errors="replace") for a in raw]
    if "run" not in argv or not any(a == "tfgpud" or a.endswith("/tfgpud") for a in argv):
        return None
    for i, arg in enumerate(argv[:-1]):
        if arg == "--config" or arg.startswith("--config="):
            value = arg.partition("=")[2] or argv[i + 1]
            # A relative path is the daemon's, not ours: resolve it in its working directory.
            return Path(value) if value.startswith("/") else Path(f"/proc/{pid}/cwd", value)
    return DEFAULT_CONFIG_PATH


def cmd_reload(args: argparse.Namespace) -> int:
    """Validate the file the daemon would re-read, then send it SIGHUP; systemd's ExecReload.

    An invalid file exits 78 and sends nothing, so `systemctl reload` fails while the daemon
    keeps its running configuration (the daemon validates again on SIGHUP and keeps the old
    one on any error). A PID that is not ``tfgpud run`` is not signalled (exit 1)."""
    try:
        path = _daemon_config_path(args.pid)
    except OSError as exc:
        _err(f"cannot read process {args.pid}: {exc.strerror or exc}; is tfgpud running?")
        return EX_FAILURE
    if path is None:
        _err(f"process {args.pid} is not `tfgpud run`; not signalled")
        return EX_FAILURE
    try:
        _check_web_config(load_config(path))
    except ConfigError as exc:
        _err(f"{exc.render()}\nNot reloaded: tfgpud keeps its running configuration.")
        return EX_CONFIG
    try:
        os.kill(args.pid, signal.SIGHUP)
    except OSError as exc:
        _err(f"cannot signal process {args.pid}: {exc.strerror or exc}")
        return EX_FAILURE
    print(f"{path}: valid; asked tfgpud (pid {args.pid}) to reload it")
    return EX_OK


def cmd_run(args: argparse.Namespace) -> int:
    from tfgpud.daemon import Daemon, StartupError
    from tfgpud.systemd import setup_logging

    try:
        config, path = _load(args.config)
        _check_web_config(config)
    except ConfigError as exc:
        _err(exc.render())
        return EX_CONFIG
    setup_logging(config.daemon.log_level)
    if path is None:
        _err(f"no configuration at {DEFAULT_CONFIG_PATH}; running with built-in defaults")
    try:
        daemon = Daemon(config, path)
        return daemon.run()
    except StartupError as exc:
        _err(str(exc))
        return EX_FAILURE
    except OSError as exc:  # e.g. a state directory or socket the OS refuses
        where = f" ({exc.filename})" if exc.filename else ""
        _err(
            f"cannot start: {exc.strerror or exc}{where}. Check the paths and permissions "
            "in the configuration and the service's sandbox (ReadWritePaths=, StateDirectory=)."
        )
        return EX_FAILURE


def cmd_doctor(args: argparse.Namespace) -> int:
    from tfgpud.doctor import run_doctor

    # The report is the output; collectors' log lines would only interleave with it.
    logging.basicConfig(level=logging.ERROR, format="tfgpud: %(message)s")
    try:
        config, _ = _load(args.config)
    except ConfigError as exc:
        _err(exc.render())
        return EX_CONFIG
    python = args.python
    if python is not None and "/" in python:
        python = os.path.abspath(python)  # not resolve(): a venv's python is a symlink
    return run_doctor(config, python=python, as_json=args.json, out=sys.stdout)


def _status_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    listen = DEFAULT_LISTEN
    try:
        config, _ = _load(args.config)
        listen = config.http.listen
    except ConfigError:
        pass
    host, port = parse_listen(listen)
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def cmd_status(args: argparse.Namespace) -> int:
    base = _status_url(args)
    request = urllib.request.Request(f"{base}/status")
    if args.user:
        # The password comes from the environment or a prompt, never from argv (ps shows it).
        password = os.environ.get("TFGPUD_PASSWORD")
        if password is None:
            if not sys.stdin.isatty():
                _err("--user needs TFGPUD_PASSWORD in the environment when not on a terminal")
                return EX_USAGE
            password = getpass.getpass(f"password for {args.user}: ")
        token = base64.b64encode(f"{args.user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    context = None
    if base.startswith("https:"):
        context = ssl.create_default_context(cafile=args.cacert)
    try:
        with urllib.request.urlopen(request, timeout=args.timeout, context=context) as resp:
            doc: dict[str, Any] = json.load(resp)
    except urllib.error.HTTPError as exc:
        hint = " (check --user and TFGPUD_PASSWORD)" if exc.code == 401 else ""
        _err(f"{base}/status answered {exc.code} {exc.reason}{hint}")
        return EX_FAILURE
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        _err(
            f"cannot read {base}/status: {reason}. Is the daemon running "
            "(`systemctl status tfgpud`), and is --url right?"
        )
        return EX_FAILURE
    if args.json:
        json.dump(doc, sys.stdout, indent=2, sort_keys=True)
        print()
        return EX_OK
    print(render_status_text(doc), end="")
    return EX_OK


def _when(ts: float | None) -> str:
    return "?" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def cmd_baseline(args: argparse.Namespace) -> int:
    """show | reset | forget UUID on the baseline in the configuration's [daemon] state_dir."""
    from tfgpud.state import Baseline, StateFileError, forget_gpu, reset_baseline

    try:
        config, _ = _load(args.config)
    except ConfigError as exc:
        _err(exc.render())
        return EX_CONFIG
    state_dir = config.daemon.state_dir
    reread = "a running daemon re-reads it at its next poll"
    try:
        if args.action == "show":
            b = Baseline.read(state_dir, config.expect.gpus)
            if args.json:
                doc = {
                    "path": str(b.path),
                    "expect": config.expect.gpus,
                    "expected_gpus": b.expected,
                    "gpus": [to_jsonable(g) for g in b.gpus],
                    "problems": list(b.problems()),
                }
                json.dump(doc, sys.stdout, indent=2, sort_keys=True)
                print()
                return EX_OK
            exists = b.path.exists()
            print(
                f"baseline {b.path}{'' if exists else ' (not written yet)'}: "
                f"{b.expected} GPU(s) expected ([expect] gpus = {config.expect.gpus})"
            )
            for g in b.gpus:
                print(
                    f"  {g.uuid}  {g.name or '?':<28} {g.pci_bus_id or '?':<16} "
                    f"first seen {_when(g.first_seen)}, last seen {_when(g.last_seen)}"
                )
            for problem in b.problems():
                print(f"  problem: {problem}")
            return EX_OK
        if args.action == "reset":
            removed, moved = reset_baseline(state_dir)
            if moved is not None:
                print(f"moved the unreadable baseline aside to {moved}")
            print(
                f"baseline reset: {len(removed)} GPU(s) forgotten; {reread}, re-learning the GPUs"
            )
            return EX_OK
        gone = forget_gpu(state_dir, args.uuid)
        print(f"forgot {gone.uuid} ({gone.name or '?'} at {gone.pci_bus_id or '?'}); {reread}")
        return EX_OK
    except StateFileError as exc:
        _err(f"{exc}. `tfgpud baseline reset` moves it aside and starts a new baseline.")
    except KeyError:
        try:
            known = ", ".join(g.uuid for g in Baseline.read(state_dir).gpus) or "none"
        except StateFileError as exc:  # replaced by an unusable file since forget read it
            known = f"unknown: {exc}"
        _err(
            f"{args.uuid} is not in the baseline {Path(state_dir) / 'baseline.json'} "
            f"(known: {known}); see `tfgpud baseline show`."
        )
    except OSError as exc:
        _err(
            f"cannot write the baseline in {state_dir}: {exc.strerror or exc}. Run it as root "
            "or as the user the daemon runs as."
        )
    return EX_FAILURE


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tfgpud",
        description="Tells whether TensorFlow can use this machine's NVIDIA GPUs, and if not, why.",
    )
    parser.add_argument("--version", action="version", version=f"tfgpud {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the daemon in the foreground")
    p.add_argument(
        "--config", metavar="PATH", help=f"configuration (default {DEFAULT_CONFIG_PATH})"
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("doctor", help="one full diagnosis now (exit 0 ok, 1 warning, 2 critical)")
    p.add_argument("--config", metavar="PATH")
    p.add_argument("--python", metavar="PATH", help="check this interpreter instead of the envs")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("status", help="what the running daemon currently sees")
    p.add_argument("--url", help="daemon base URL (default: from the configuration)")
    p.add_argument("--config", metavar="PATH")
    p.add_argument("--json", action="store_true")
    p.add_argument("--user", help="basic-auth user (password: $TFGPUD_PASSWORD or a prompt)")
    p.add_argument("--cacert", metavar="PATH", help="CA file to verify an https:// daemon")
    p.add_argument("--timeout", type=float, default=5.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("check-config", help="validate a configuration file (exit 78 if invalid)")
    p.add_argument("path", type=Path)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser(
        "reload", help="validate the daemon's configuration file, then make it re-read it (SIGHUP)"
    )
    p.add_argument("--pid", type=int, required=True, help="the daemon's PID ($MAINPID)")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("baseline", help="show or change the GPUs this machine is expected to have")
    p.add_argument("--config", metavar="PATH")
    bsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = bsub.add_parser("show", help="list the expected GPUs (exit 1 if the file is unusable)")
    show.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS)
    show.add_argument("--json", action="store_true")
    reset = bsub.add_parser("reset", help="forget all; the daemon re-learns the GPUs it sees")
    reset.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS)
    forget = bsub.add_parser("forget", help="accept that one GPU is gone for good")
    forget.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS)
    forget.add_argument("uuid", metavar="UUID")
    p.set_defaults(func=cmd_baseline)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
