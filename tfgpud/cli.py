"""Command line: ``tfgpud run | doctor | status | check-config | reload | baseline``.

Exit codes (:data:`EXIT_CODES`): 0 ok; doctor 1 warnings / 2 critical; 1 runtime failure (e.g.
port in use, daemon unreachable); 64 usage; 78 invalid configuration (EX_CONFIG). Errors are
one paragraph for a person, never a traceback; with ``--json`` they are a JSON object on stdout
too. Text on a terminal is coloured unless ``NO_COLOR`` is set; never in a pipe or in JSON.
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
import urllib.parse
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
from tfgpud.text import PrintableLogFilter, printable
from tfgpud.views import render_status_text

EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 64
EX_CONFIG = 78
EX_INTERRUPTED = 130

EXIT_CODES = """exit status:
  0    ok (doctor: healthy, or info findings only)
  1    doctor: warnings; any other command: it failed (daemon unreachable, port in use, ...)
  2    doctor: critical findings
  64   usage error: unknown option, missing or malformed argument
  78   invalid configuration (EX_CONFIG): the message names file, line and key
  130  interrupted (Ctrl-C)"""


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
    # Messages quote paths, keys and server answers: never let one drive the terminal.
    print(f"tfgpud: {printable(message, newlines=True)}", file=sys.stderr)


def _json_error(message: str, code: int, **extra: object) -> int:
    """``--json`` on failure: the error as JSON on stdout (and for a person on stderr)."""
    _err(message)
    doc = {"ok": False, "error": message, "exit_code": code, **extra}
    json.dump(doc, sys.stdout, indent=2, sort_keys=True)
    print()
    return code


def use_colour(stream: Any, environ: Any = None) -> bool:
    """Colour for a person: ``stream`` is a terminal, ``NO_COLOR`` is unset or empty
    (no-color.org) and ``TERM`` is not ``dumb``."""
    env = os.environ if environ is None else environ
    isatty = getattr(stream, "isatty", None)
    return bool(
        isatty is not None and isatty() and not env.get("NO_COLOR") and env.get("TERM") != "dumb"
    )


def _escape_logs() -> None:
    """Every log line printable (see tfgpud.text.PrintableLogFilter), whatever handler."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, PrintableLogFilter) for f in handler.filters):
            handler.addFilter(PrintableLogFilter())


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
    _escape_logs()
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
    from tfgpud.runner import become_subreaper

    # The report is the output; collectors' log lines would only interleave with it.
    logging.basicConfig(level=logging.ERROR, format="tfgpud: %(message)s")
    _escape_logs()
    try:
        config, _ = _load(args.config)
    except ConfigError as exc:
        if args.json:
            return _json_error(exc.render(), EX_CONFIG)
        _err(exc.render())
        return EX_CONFIG
    python = args.python
    if python is not None and "/" in python:
        python = os.path.abspath(python)  # not resolve(): a venv's python is a symlink
    colour = not args.json and use_colour(sys.stdout)
    # What a probe leaves behind comes back here to be killed, as in the daemon (an
    # interpreter that exits at once orphans its background processes before any walk sees
    # them as its descendants).
    become_subreaper()
    return run_doctor(config, python=python, as_json=args.json, out=sys.stdout, colour=colour)


def daemon_url(value: str) -> str:
    """``--url``: ``http(s)://HOST:PORT[/PATH]`` or ``HOST:PORT`` / ``HOST`` / ``[V6]:PORT``
    (http, default port 10041) as a base URL without a trailing slash; ValueError when it is
    none of these."""
    text = value.strip()
    bare = "://" not in text
    if bare:
        text = f"http://{text}"
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not HOST:PORT or an http(s):// URL")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{value!r}: the port is not a number from 0 to 65535") from None
    netloc = parts.netloc
    if bare and port is None:
        netloc += f":{parse_listen(DEFAULT_LISTEN)[1]}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _url_argument(value: str) -> str:
    try:
        return daemon_url(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _status_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url)
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

    def fail(message: str, code: int = EX_FAILURE) -> int:
        if args.json:
            return _json_error(message, code, url=base)
        _err(message)
        return code

    request = urllib.request.Request(f"{base}/status")
    if args.user:
        # The password comes from the environment or a prompt, never from argv (ps shows it).
        password = os.environ.get("TFGPUD_PASSWORD")
        if password is None:
            if not sys.stdin.isatty():
                return fail(
                    "--user needs TFGPUD_PASSWORD in the environment when not on a terminal",
                    EX_USAGE,
                )
            password = getpass.getpass(f"password for {args.user}: ")
        token = base64.b64encode(f"{args.user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    context = None
    try:
        if base.startswith("https:"):
            context = ssl.create_default_context(cafile=args.cacert)
        with urllib.request.urlopen(request, timeout=args.timeout, context=context) as resp:
            doc: Any = json.load(resp)
    except urllib.error.HTTPError as exc:
        hint = " (check --user and TFGPUD_PASSWORD)" if exc.code == 401 else ""
        return fail(f"{base}/status answered {exc.code} {exc.reason}{hint}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return fail(
            f"cannot read {base}/status: {reason}. Is the daemon running "
            "(`systemctl status tfgpud`), and is --url right?"
        )
    if not isinstance(doc, dict):
        return fail(f"{base}/status did not answer a tfgpud status document")
    if args.json:
        json.dump(doc, sys.stdout, indent=2, sort_keys=True)
        print()
        return EX_OK
    print(render_status_text(doc, colour=use_colour(sys.stdout)), end="")
    return EX_OK


def _when(ts: float | None) -> str:
    return "?" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def cmd_baseline(args: argparse.Namespace) -> int:
    """show | reset | forget UUID on the baseline in the configuration's [daemon] state_dir."""
    from tfgpud.state import Baseline, StateFileError, forget_gpu, reset_baseline

    try:
        config, _ = _load(args.config)
    except ConfigError as exc:
        if getattr(args, "json", False):
            return _json_error(exc.render(), EX_CONFIG)
        _err(exc.render())
        return EX_CONFIG
    state_dir = config.daemon.state_dir
    reread = "a running daemon re-reads it at its next poll"
    as_json = bool(getattr(args, "json", False))

    def fail(message: str) -> int:
        if as_json:
            return _json_error(message, EX_FAILURE)
        _err(message)
        return EX_FAILURE

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
            lines = [
                f"baseline {b.path}{'' if exists else ' (not written yet)'}: "
                f"{b.expected} GPU(s) expected ([expect] gpus = {config.expect.gpus})"
            ]
            lines += [
                f"  {g.uuid}  {g.name or '?':<28} {g.pci_bus_id or '?':<16} "
                f"first seen {_when(g.first_seen)}, last seen {_when(g.last_seen)}"
                for g in b.gpus
            ]
            lines += [f"  problem: {problem}" for problem in b.problems()]
            # The names come from a file: printable, one line each.
            print("\n".join(printable(line) for line in lines))
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
        print(
            printable(f"forgot {gone.uuid} ({gone.name or '?'} at {gone.pci_bus_id or '?'}); ")
            + reread
        )
        return EX_OK
    except StateFileError as exc:
        return fail(f"{exc}. `tfgpud baseline reset` moves it aside and starts a new baseline.")
    except KeyError:
        try:
            known = ", ".join(g.uuid for g in Baseline.read(state_dir).gpus) or "none"
        except StateFileError as exc:  # replaced by an unusable file since forget read it
            known = f"unknown: {exc}"
        return fail(
            f"{args.uuid} is not in the baseline {Path(state_dir) / 'baseline.json'} "
            f"(known: {known}); see `tfgpud baseline show`."
        )
    except OSError as exc:
        return fail(
            f"cannot write the baseline in {state_dir}: {exc.strerror or exc}. Run it as root "
            "or as the user the daemon runs as."
        )


class UsageError(Exception):
    """A command line argparse rejects; ``parser`` is the (sub)command whose usage applies."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise UsageError(self, message)


_CONFIG_HELP = f"the configuration file (default {DEFAULT_CONFIG_PATH}, else built-in defaults)"


def _config_option(p: argparse.ArgumentParser, **kw: Any) -> None:
    p.add_argument("--config", metavar="PATH", help=_CONFIG_HELP, **kw)


def _json_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--json", action="store_true", help=f"{what} as JSON on stdout (errors too: ok=false)"
    )


def _subcommand(sub: Any, name: str, help_text: str, **kw: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help_text,
        description=kw.pop("description", help_text[:1].upper() + help_text[1:] + "."),
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kw,
    )
    p.set_defaults(usage_parser=p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tfgpud",
        description="Tells whether TensorFlow can use this machine's NVIDIA GPUs, and if not, why.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tfgpud {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _subcommand(sub, "run", "run the daemon in the foreground (systemd Type=notify)")
    _config_option(p)
    p.set_defaults(func=cmd_run)

    p = _subcommand(sub, "doctor", "one full diagnosis now (exit 0 ok, 1 warning, 2 critical)")
    _config_option(p)
    p.add_argument(
        "--python",
        metavar="PATH",
        help="probe only this interpreter (as env `cli`) instead of the configuration's envs",
    )
    _json_option(p, "the snapshot and findings")
    p.set_defaults(func=cmd_doctor)

    p = _subcommand(sub, "status", "what the running daemon currently sees")
    p.add_argument(
        "--url",
        type=_url_argument,
        metavar="URL",
        help="the daemon: http(s)://HOST:PORT or HOST:PORT (default: [http] listen of the "
        f"configuration, else {DEFAULT_LISTEN})",
    )
    _config_option(p)
    _json_option(p, "the daemon's /status document")
    p.add_argument(
        "--user", metavar="USER", help="basic-auth user (password: $TFGPUD_PASSWORD or a prompt)"
    )
    p.add_argument("--cacert", metavar="PATH", help="CA file to verify an https:// daemon")
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="give up on the daemon after this long (default 5)",
    )
    p.set_defaults(func=cmd_status)

    p = _subcommand(sub, "check-config", "validate a configuration file (exit 78 if invalid)")
    p.add_argument("path", type=Path, metavar="PATH", help="the TOML file to check")
    p.set_defaults(func=cmd_check_config)

    p = _subcommand(
        sub, "reload", "validate the daemon's configuration file, then make it re-read it (SIGHUP)"
    )
    p.add_argument("--pid", type=int, required=True, help="the daemon's PID ($MAINPID)")
    p.set_defaults(func=cmd_reload)

    p = _subcommand(sub, "baseline", "show or change the GPUs this machine is expected to have")
    _config_option(p)
    bsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = _subcommand(bsub, "show", "list the expected GPUs (exit 1 if the file is unusable)")
    _config_option(show, default=argparse.SUPPRESS)
    _json_option(show, "the baseline")
    reset = _subcommand(bsub, "reset", "forget all; the daemon re-learns the GPUs it sees")
    _config_option(reset, default=argparse.SUPPRESS)
    forget = _subcommand(bsub, "forget", "accept that one GPU is gone for good")
    _config_option(forget, default=argparse.SUPPRESS)
    forget.add_argument("uuid", metavar="UUID", help="its UUID (see `tfgpud baseline show`)")
    p.set_defaults(func=cmd_baseline)
    return parser


def _usage_error(exc: UsageError, argv: Sequence[str]) -> int:
    """Exit 64 with the usage of the (sub)command that was given, as argparse would print it;
    with ``--json`` in the arguments also the error as JSON."""
    exc.parser.print_usage(sys.stderr)
    message = f"{exc.parser.prog}: error: {exc.message}"
    print(printable(message), file=sys.stderr)
    if "--json" in argv:
        doc = {"ok": False, "error": message, "exit_code": EX_USAGE}
        json.dump(doc, sys.stdout, indent=2, sort_keys=True)
        print()
    return EX_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(args_in)
        if unknown:
            usage_parser: argparse.ArgumentParser = getattr(args, "usage_parser", parser)
            usage_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except UsageError as exc:
        return _usage_error(exc, args_in)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return EX_INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
