"""Collector ``tensorflow``: probe each configured Python env in a child process (parent side).

TensorFlow is never imported here. :func:`probe_env` runs ``tfprobe.py`` with the env's own
interpreter through :mod:`tfgpud.runner` and turns whatever happens — a report, a missing
interpreter, an import error, a crash, a hang, garbage — into a :class:`TfProbeResult`.
:class:`TfProbeScheduler` decides when each env is probed and runs probes on worker threads,
so a probe never delays the poll loop or a scrape.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from tfgpud.config import TensorflowConfig, TfEnvConfig
from tfgpud.model import (
    LibraryCheck,
    NvmlReading,
    ProbeStatus,
    TfGpu,
    TfProbeResult,
    frozen_map,
)
from tfgpud.probe_safety import SAFE_PATH, decide_probe_user, resolve_interpreter
from tfgpud.runner import MIB, RunResult, abandoned_children, deadline_scope, run_bounded

log = logging.getLogger(__name__)

PROBE_SCRIPT = Path(__file__).resolve().parent.parent / "tfprobe.py"
MAX_OUTPUT = MIB  # a real report is ~5 KB; anything near 1 MiB is not a report
MAX_LOG_LINES = 40
MAX_LOG_LINE_CHARS = 400
# Variables that must never reach the probe: it is not the daemon's systemd service.
_FORBIDDEN_ENV = re.compile(r"^(NOTIFY_SOCKET|WATCHDOG_\w*|LISTEN_\w*)$")

# Message texts from reference §3 worth keeping as evidence (matched case-insensitively on the
# message, never on the log prefix, which changes across TF versions).
_MEANINGFUL = tuple(
    s.lower()
    for s in (
        "Could not find cuda drivers",
        "Could not load dynamic library",
        "Cannot dlopen some GPU libraries",
        "failed call to cuInit",
        "CUDA_VISIBLE_DEVICES",
        "kernel driver does not appear to be running",
        "no NVIDIA GPU device is present",
        "does not match DSO version",
        "COMPAT_NOT_SUPPORTED",
        "driver version is insufficient",
        "Ignoring visible gpu device",
        "not built with CUDA kernel binaries",
        "CUDA_ERROR",
        "Loaded runtime CuDNN library",
        "out of memory",
        "OOM when allocating",
        "Created device",
        "Illegal instruction",
        "compiled to use",
        "Error",
        "Traceback",
    )
)
_NOISE = tuple(
    s.lower()
    for s in (
        "Could not find TensorRT",
        "Unable to register",
        "NUMA node",
        "All log messages before absl::InitializeLog",
        "oneDNN custom operations",
    )
)
# "2025-09-17 14:44:05.157831: I external/.../x.cc:32] msg" and "I0000 00:00:17.2 3722 x.cc:31] msg"
_PREFIXES = (
    re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] [^\]]*\] "),
    re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ [^\]]*\] "),
)
_SIGNAL_MEANING = {
    "SIGILL": "the CPU lacks instructions (e.g. AVX/AVX2) this TensorFlow build was compiled for",
    "SIGSEGV": "a native library crashed (often mismatched CUDA/cuDNN libraries or a bad wheel)",
    "SIGBUS": "a memory-mapped library file changed or is corrupt",
    "SIGKILL": "killed from outside (often the kernel's OOM killer)",
    "SIGABRT": "a native library aborted (see the log lines)",
}


def meaningful_log_lines(stderr: bytes, *, limit: int = MAX_LOG_LINES) -> tuple[str, ...]:
    """TF's stderr lines that explain GPU visibility, prefixes stripped, deduplicated, bounded."""
    kept: list[str] = []
    for raw in stderr.decode("utf-8", errors="replace").splitlines():
        line = raw.strip()
        for prefix in _PREFIXES:
            line = prefix.sub("", line)
        low = line.lower()
        if not line or any(n in low for n in _NOISE) or not any(m in low for m in _MEANINGFUL):
            continue
        line = line[:MAX_LOG_LINE_CHARS]
        if line not in kept:
            kept.append(line)
            if len(kept) >= limit:
                break
    return tuple(kept)


def _stderr_tail(stderr: bytes, lines: int = 10) -> tuple[str, ...]:
    text = stderr.decode("utf-8", errors="replace").strip().splitlines()
    return tuple(t[:MAX_LOG_LINE_CHARS] for t in text[-lines:])


def probe_environment(
    env: TfEnvConfig, *, home: str | None = None, user_site: bool = True
) -> dict[str, str]:
    """The complete environment a probe of ``env`` gets: clean, explicit, nothing inherited.

    PATH (the env's bin dir first, as activation would), HOME (``home``, else ``/``: never the
    caller's), LANG, then the env's ``environment`` table, then TF_CPP_MIN_LOG_LEVEL=0 so TF's
    diagnostics are never hidden, and PYTHONNOUSERSITE=1 unless ``user_site``.
    LD_LIBRARY_PATH only appears when the table sets it.
    """
    bindir = os.path.dirname(env.python)
    result = {
        "PATH": f"{bindir}:{SAFE_PATH}" if os.path.isabs(env.python) else SAFE_PATH,
        "HOME": home or "/",
        "LANG": "C.UTF-8",
    }
    result.update(env.environment)
    result["TF_CPP_MIN_LOG_LEVEL"] = "0"
    if not user_site:
        result["PYTHONNOUSERSITE"] = "1"
    return {k: v for k, v in result.items() if not _FORBIDDEN_ENV.match(k)}


def _home_of(user: str | None) -> str | None:
    if user is None:
        return None
    try:
        return pwd.getpwnam(user).pw_dir
    except KeyError:
        return None


def _ids(user: str | None) -> tuple[int, int, set[int]] | None:
    if user is None:
        return os.geteuid(), os.getegid(), {os.getegid(), *os.getgroups()}
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid, set(os.getgrouplist(pw.pw_name, pw.pw_gid))


def access_denials(python: str, user: str | None) -> list[str]:
    """The paths (directories above the interpreter, or the interpreter itself, also along its
    symlink target) whose mode keeps ``user`` (None: this process) from executing ``python``.
    ACLs are not read; a path this process cannot stat ends that line."""
    ids = _ids(user)
    if ids is None or ids[0] == 0:
        return []
    uid, _, gids = ids
    out: list[str] = []
    seen: set[str] = set()
    for target in (os.path.abspath(python), os.path.realpath(python)):
        parts = target.split(os.sep)
        for i in range(1, len(parts) + 1):
            p = os.sep.join(parts[:i]) or "/"
            if p in seen:
                continue
            seen.add(p)
            try:
                st = os.stat(p)
            except OSError:
                break
            if st.st_uid == uid:
                ok = st.st_mode & stat.S_IXUSR
            elif st.st_gid in gids:
                ok = st.st_mode & stat.S_IXGRP
            else:
                ok = st.st_mode & stat.S_IXOTH
            if not ok:
                out.append(p)  # every denying component: each needs the fix
    return out


class _BadReport(ValueError):
    """The probe's JSON did not have the expected shape."""


def _opt_str(value: Any, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _BadReport(f"{what} is {type(value).__name__}, expected a string")


def _str_map(value: Any, what: str) -> Mapping[str, str]:
    if value is None:
        return frozen_map()
    if not isinstance(value, dict):
        raise _BadReport(f"{what} is {type(value).__name__}, expected an object")
    return frozen_map({str(k): str(v) for k, v in value.items()})


def _str_tuple(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _BadReport(f"{what} is {type(value).__name__}, expected a list")
    return tuple(str(v) for v in value)


def _cc(value: Any) -> tuple[int, int] | None:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (value[0], value[1])
    return None


def _gpus(value: Any) -> tuple[TfGpu, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(g, dict) for g in value):
        raise _BadReport("gpus is not a list of objects")
    return tuple(
        TfGpu(
            name=str(g.get("name", "?")),
            device_name=_opt_str(g.get("device_name"), "gpus[].device_name"),
            compute_capability=_cc(g.get("compute_capability")),
        )
        for g in value
    )


def _libraries(value: Any) -> tuple[LibraryCheck, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _BadReport("libraries is not a list of objects")
    return tuple(
        LibraryCheck(
            name=str(v.get("name", "?")),
            soname=str(v.get("soname", "?")),
            loaded=bool(v.get("loaded")),
            path=_opt_str(v.get("path"), "libraries[].path"),
            error=_opt_str(v.get("error"), "libraries[].error"),
        )
        for v in value
    )


def parse_probe_run(
    env: TfEnvConfig,
    run: RunResult,
    *,
    started_at: float,
    timeout: float,
    user: str | None = None,
    python: str | None = None,
) -> TfProbeResult:
    """Turn one finished probe child into a TfProbeResult. Never raises.

    ``user`` is who the child ran as (None: this process) and ``python`` the resolved
    interpreter, used to explain a permission error.
    """
    base: dict[str, Any] = {
        "env": env.name,
        "python": env.python,
        "started_at": started_at,
        "duration_seconds": run.duration_seconds,
        "returncode": run.returncode,
        "signal_name": run.signal_name,
        "cpu_seconds": run.cpu_seconds,
        "max_rss_bytes": run.max_rss_bytes,
        "abandoned_pid": run.abandoned_pid,
    }
    logs = meaningful_log_lines(run.stderr)

    def fail(status: ProbeStatus, error: str) -> TfProbeResult:
        lines = logs or _stderr_tail(run.stderr)
        return TfProbeResult(status=status, error=error, log_lines=lines, **base)

    if run.error is not None:
        if run.error.startswith("executable not found"):
            return fail(ProbeStatus.MISSING_INTERPRETER, f"interpreter {env.python} not found")
        if run.error.startswith("unknown user"):
            return fail(ProbeStatus.REFUSED, f"run_as: {run.error}")
        if run.error.startswith("permission denied"):
            return _no_access(env, run, base, logs, user=user, python=python)
        return fail(ProbeStatus.ERROR, run.error)
    if run.timed_out:
        return fail(ProbeStatus.TIMEOUT, f"no answer within {timeout:g} s; process group killed")
    if run.cancelled:
        return fail(ProbeStatus.ERROR, "probe cancelled (daemon shutting down)")
    if run.signal_name is not None:
        # TF/CUDA may crash at interpreter shutdown, after the report is complete: keep it.
        done = _report_result(run, base, logs)
        if done.status in (ProbeStatus.OK, ProbeStatus.IMPORT_FAILED):
            note = (
                f"probe process died by {run.signal_name} after writing a complete report "
                "(at interpreter shutdown); the report is used"
            )
            return replace(done, log_lines=(*done.log_lines, note))
        meaning = _SIGNAL_MEANING.get(run.signal_name)
        detail = f": {meaning}" if meaning else ""
        return fail(ProbeStatus.CRASHED, f"probe killed by {run.signal_name}{detail}")
    return _report_result(run, base, logs)


def _no_access(
    env: TfEnvConfig,
    run: RunResult,
    base: dict[str, Any],
    logs: tuple[str, ...],
    *,
    user: str | None,
    python: str | None,
) -> TfProbeResult:
    interpreter = python or env.python
    denied = tuple(access_denials(interpreter, user)) if os.path.isabs(interpreter) else ()
    who = user or _user_name(os.geteuid())
    where = f": no search/execute permission on {', '.join(denied)}" if denied else ""
    return TfProbeResult(
        status=ProbeStatus.NO_ACCESS,
        error=f"user {who} may not execute {interpreter}{where} ({run.error})",
        log_lines=logs or _stderr_tail(run.stderr),
        probe_user=who,
        denied_paths=denied,
        **base,
    )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _report_result(run: RunResult, base: dict[str, Any], logs: tuple[str, ...]) -> TfProbeResult:
    """The result the child's stdout describes (BAD_OUTPUT/ERROR when it is no report)."""

    def fail(status: ProbeStatus, error: str) -> TfProbeResult:
        lines = logs or _stderr_tail(run.stderr)
        return TfProbeResult(status=status, error=error, log_lines=lines, **base)

    if run.stdout_truncated:
        return fail(ProbeStatus.BAD_OUTPUT, f"probe wrote more than {len(run.stdout)} bytes")
    text = run.stdout.decode("utf-8", errors="replace").strip()
    if not text:
        return fail(
            ProbeStatus.ERROR, f"probe exited with status {run.returncode} without a report"
        )
    try:
        data = json.loads(text)
    except ValueError:
        return fail(ProbeStatus.BAD_OUTPUT, f"probe output is not JSON: {text[:120]!r}")
    if not isinstance(data, dict) or data.get("schema") != 1:
        schema = data.get("schema") if isinstance(data, dict) else None
        return fail(ProbeStatus.BAD_OUTPUT, f"unexpected probe report (schema {schema!r})")
    try:
        py_raw, smoke_raw = data.get("python"), data.get("smoke")
        py: dict[str, Any] = py_raw if isinstance(py_raw, dict) else {}
        smoke: dict[str, Any] | None = smoke_raw if isinstance(smoke_raw, dict) else None
        fields_: dict[str, Any] = {
            "tf_version": _opt_str(data.get("tf_version"), "tf_version"),
            "build_info": _str_map(data.get("build_info"), "build_info"),
            "gpus": _gpus(data.get("gpus")),
            "environment": _str_map(data.get("environment"), "environment"),
            "packages": _str_map(data.get("packages"), "packages"),
            "libraries": _libraries(data.get("libraries")),
            "python_version": _opt_str(py.get("version"), "python.version"),
            "traceback": _str_tuple(data.get("traceback"), "traceback"),
            "library_search_dirs": _str_tuple(data.get("library_search_dirs"), "search dirs"),
            "package_dirs": _str_tuple(data.get("package_dirs"), "package_dirs"),
            "device_access": _str_map(data.get("device_access"), "device_access"),
            "smoke_ok": bool(smoke.get("ok")) if smoke is not None else None,
            "smoke_error": (
                _opt_str(smoke.get("error"), "smoke.error") if smoke is not None else None
            ),
        }
        import_error = _opt_str(data.get("import_error"), "import_error")
    except _BadReport as exc:
        return fail(ProbeStatus.BAD_OUTPUT, f"malformed probe report: {exc}")
    status = ProbeStatus.IMPORT_FAILED if import_error else ProbeStatus.OK
    return TfProbeResult(status=status, error=import_error, log_lines=logs, **fields_, **base)


class Runner(Protocol):
    def __call__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        timeout: float,
        max_output: int = ...,
        cwd: str | None = ...,
        user: str | None = ...,
        cancel: threading.Event | None = ...,
    ) -> RunResult: ...


def probe_env(
    env: TfEnvConfig,
    *,
    timeout: float,
    runner: Runner = run_bounded,
    script: Path = PROBE_SCRIPT,
    cancel: threading.Event | None = None,
    euid: int | None = None,
) -> TfProbeResult:
    """Probe one env now (blocks up to ~``timeout`` s). Every failure is a status, not a raise.

    A bare interpreter name is resolved on the probe's PATH first; that absolute path is both
    checked and executed. As root, an env another user can write is refused (status REFUSED,
    ``refused_writers``) unless ``run_as`` names that user, and then the child runs as that
    user with that user's HOME; not as root, the child runs as tfgpud's own user (see
    :mod:`tfgpud.probe_safety`). A child not run as a named user gets ``python -s``,
    PYTHONNOUSERSITE=1 and a fresh private HOME, removed afterwards: no user site-packages,
    and never the caller's (or tfgpud's) HOME.
    """
    started_at = time.time()

    def early(status: ProbeStatus, error: str, **kw: Any) -> TfProbeResult:
        return TfProbeResult(
            env=env.name,
            python=env.python,
            status=status,
            started_at=started_at,
            duration_seconds=time.time() - started_at,
            error=error,
            **kw,
        )

    search_path = probe_environment(env)["PATH"]
    python = resolve_interpreter(env.python, search_path)
    if python is None:
        return early(
            ProbeStatus.MISSING_INTERPRETER,
            f"interpreter {env.python} not found on PATH {search_path}",
        )
    decision = decide_probe_user(env, euid=euid, python=python, script=str(script))
    if decision.refused is not None:
        log.warning("not probing TensorFlow env %s: %s", env.name, decision.refused)
        return early(
            ProbeStatus.REFUSED,
            decision.refused,
            log_lines=decision.evidence,
            refused_writers=decision.writers,
        )
    if env.run_as and decision.user is None:
        log.debug("env %s: run_as ignored, tfgpud is not root (probing as itself)", env.name)
    as_named_user = decision.user is not None
    argv = [python, str(script)] if as_named_user else [python, "-s", str(script)]
    if env.smoke_test:
        argv.append("--smoke")
    home: str | None = None
    try:
        if as_named_user:
            environment = probe_environment(env, home=_home_of(decision.user))
        else:
            home = tempfile.mkdtemp(prefix="tfgpud-probe-home-")
            environment = probe_environment(env, home=home, user_site=False)
        run = runner(
            argv,
            env=environment,
            timeout=timeout,
            max_output=MAX_OUTPUT,
            cwd="/",
            user=decision.user,
            cancel=cancel,
        )
    except Exception as exc:  # an injected or future runner must not break polls
        log.exception("probe runner failed for env %s", env.name)
        return early(ProbeStatus.ERROR, f"runner failed: {type(exc).__name__}: {exc}")
    finally:
        if home is not None:
            shutil.rmtree(home, ignore_errors=True)
    return parse_probe_run(
        env, run, started_at=started_at, timeout=timeout, user=decision.user, python=python
    )


# --- cadence ------------------------------------------------------------------------------------


class ProbeFn(Protocol):
    def __call__(
        self, env: TfEnvConfig, *, timeout: float, cancel: threading.Event
    ) -> TfProbeResult: ...


def _default_probe(env: TfEnvConfig, *, timeout: float, cancel: threading.Event) -> TfProbeResult:
    return probe_env(env, timeout=timeout, cancel=cancel)


Fingerprint = tuple[tuple[str, int | None], ...]


def install_fingerprint(paths: Iterable[str]) -> Fingerprint:
    """(path, mtime in ns or None) for each path: changes when pip adds, removes or upgrades."""
    out: list[tuple[str, int | None]] = []
    for p in paths:
        try:
            out.append((p, os.stat(p).st_mtime_ns))
        except OSError:
            out.append((p, None))
    return tuple(out)


def driver_fingerprint(nvml: NvmlReading) -> tuple[str | None, frozenset[str]]:
    """What about the driver changes TF's answer: its version and the set of GPU UUIDs."""
    return (nvml.driver_version, frozenset(g.uuid for g in nvml.gpus))


# REFUSED and NO_ACCESS are fixed by chown/chmod/setfacl, which change no mtime; an
# IMPORT_FAILED env may get TensorFlow installed (also caught by the site dirs' mtimes).
_RETRY_STATUSES = frozenset(
    {
        ProbeStatus.TIMEOUT,
        ProbeStatus.CRASHED,
        ProbeStatus.ERROR,
        ProbeStatus.BAD_OUTPUT,
        ProbeStatus.REFUSED,
        ProbeStatus.NO_ACCESS,
        ProbeStatus.IMPORT_FAILED,
        ProbeStatus.MISSING_INTERPRETER,
    }
)


@dataclass
class _EnvState:
    env: TfEnvConfig
    started: float | None = None  # caller's (monotonic) clock, at the last start
    driver: tuple[str | None, frozenset[str]] | None = None  # at the last start
    installed: Fingerprint | None = None  # after the last finished probe
    result: TfProbeResult | None = None
    thread: threading.Thread | None = None
    abandoned_pid: int | None = None  # the last probe's child, killed but not yet gone
    runs: int = 0
    reasons: list[str] = field(default_factory=list)


class TfProbeScheduler:
    """Decides when each env is probed and runs the probes on background threads.

    Due: at start; every ``interval`` s; after a failed probe (timeout, crash, bad output)
    every ``retry_seconds``; and at once when the driver version, the NVML GPU set, or the
    env's installed TensorFlow/nvidia packages changed. Never two probes of one env at once
    (nor while the previous probe's killed child still exists), and at most
    ``max_concurrent`` probes at once across envs (the others wait for a later call).
    Methods are safe to call from one controlling thread while probes run.
    """

    def __init__(
        self,
        envs: Sequence[TfEnvConfig],
        *,
        interval: float,
        timeout: float,
        probe: ProbeFn = _default_probe,
        retry_seconds: float = 900.0,
        on_result: Callable[[], None] | None = None,
        max_concurrent: int = 1,
    ) -> None:
        self._on_result = on_result  # called on the probe's thread after each result lands
        self._states = {e.name: _EnvState(e) for e in envs}
        self._interval = interval
        self._timeout = timeout
        self._retry = min(retry_seconds, interval)
        self._probe = probe
        self._max_concurrent = max(1, max_concurrent)
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._closed = False

    @classmethod
    def from_config(
        cls,
        config: TensorflowConfig,
        *,
        probe: ProbeFn = _default_probe,
        on_result: Callable[[], None] | None = None,
    ) -> TfProbeScheduler:
        return cls(
            config.envs,
            interval=config.interval_seconds,
            timeout=config.timeout_seconds,
            probe=probe,
            on_result=on_result,
            max_concurrent=config.max_concurrent_probes,
        )

    def _due(self, st: _EnvState, nvml: NvmlReading | None, now: float) -> str | None:
        if st.started is None:
            return "first probe"
        if nvml is not None and st.driver is not None:
            version, uuids = driver_fingerprint(nvml)
            if version != st.driver[0]:
                return f"driver version changed: {st.driver[0]} -> {version}"
            if uuids != st.driver[1]:
                return "NVML GPU set changed"
        if st.installed is not None and install_fingerprint(p for p, _ in st.installed) != (
            st.installed
        ):
            return "installed packages changed"
        elapsed = now - st.started
        if elapsed >= self._interval:
            return "interval elapsed"
        failed = st.result is not None and st.result.status in _RETRY_STATUSES
        if failed and elapsed >= self._retry and st.result is not None:
            return f"retry after {st.result.status.value}"
        return None

    def maybe_start(self, nvml: NvmlReading | None, now: float) -> tuple[str, ...]:
        """Start a probe of each env that is due and not running; return their names.

        Returns at once: the probes run on worker threads. ``now`` is the caller's monotonic
        clock in seconds (``time.monotonic()``; results keep wall-clock ``started_at``);
        ``nvml`` None means "not read this poll". At most ``max_concurrent`` run at once.
        """
        started: list[str] = []
        with self._lock:
            if self._closed:
                return ()
            busy = sum(
                1 for st in self._states.values() if st.thread is not None and st.thread.is_alive()
            )
            lingering = abandoned_children()
            for name, st in self._states.items():
                if busy >= self._max_concurrent:
                    break
                if st.thread is not None and st.thread.is_alive():
                    continue
                if st.abandoned_pid is not None:
                    if st.abandoned_pid in lingering:
                        continue  # its last child is still stuck in the kernel
                    st.abandoned_pid = None
                reason = self._due(st, nvml, now)
                if reason is None:
                    continue
                st.started = now
                if nvml is not None:
                    st.driver = driver_fingerprint(nvml)
                st.runs += 1
                st.reasons.append(reason)
                del st.reasons[:-10]
                log.info("probing TensorFlow env %s (%s)", name, reason)
                st.thread = threading.Thread(
                    target=self._run, args=(st,), name=f"tfprobe-{name}", daemon=True
                )
                st.thread.start()
                busy += 1
                started.append(name)
        return tuple(started)

    def _run(self, st: _EnvState) -> None:
        try:
            # The pre-check (as root) shares the probe's timeout and is cancelled with it.
            with deadline_scope(self._timeout, self._cancel):
                result = self._probe(st.env, timeout=self._timeout, cancel=self._cancel)
        except Exception as exc:  # a worker thread must always leave a result
            log.exception("probe of env %s failed", st.env.name)
            result = TfProbeResult(
                env=st.env.name,
                python=st.env.python,
                status=ProbeStatus.ERROR,
                started_at=time.time(),
                duration_seconds=0.0,
                error=f"{type(exc).__name__}: {exc}",
            )
        paths = (st.env.python, *result.package_dirs)
        fingerprint = install_fingerprint(paths)
        with self._lock:
            st.result = result
            st.installed = fingerprint
            st.abandoned_pid = result.abandoned_pid
        log.info(
            "TensorFlow env %s: %s, %d GPU(s), %.1f s",
            st.env.name,
            result.status.value,
            len(result.gpus),
            result.duration_seconds,
        )
        if self._on_result is not None:
            self._on_result()

    def results(self) -> tuple[TfProbeResult, ...]:
        """The latest finished result of each env (envs never probed yet are absent)."""
        with self._lock:
            return tuple(st.result for st in self._states.values() if st.result is not None)

    def running(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(
                n
                for n, st in self._states.items()
                if st.thread is not None and st.thread.is_alive()
            )

    def runs(self, name: str) -> int:
        """How many probes of env ``name`` were started (for tests and the benchmark)."""
        with self._lock:
            return self._states[name].runs

    def last_reason(self, name: str) -> str | None:
        with self._lock:
            reasons = self._states[name].reasons
            return reasons[-1] if reasons else None

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no probe is running; return False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = [st.thread for st in self._states.values() if st.thread is not None]
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)

    def adopt(self, old: TfProbeScheduler) -> None:
        """Carry over the last results (and schedule) of envs whose configuration is unchanged,
        so a reload does not blank their metrics and findings until they are probed again.
        A probe still running in ``old`` is cancelled with it; that env is probed anew."""
        with old._lock, self._lock:
            for name, st in self._states.items():
                prev = old._states.get(name)
                if prev is None or prev.env != st.env or prev.result is None:
                    continue
                if prev.thread is not None and prev.thread.is_alive():
                    continue
                st.started, st.driver, st.installed = prev.started, prev.driver, prev.installed
                st.result, st.runs = prev.result, prev.runs
                st.abandoned_pid = prev.abandoned_pid

    def close(self, timeout: float = 2.0) -> None:
        """Cancel running probes (their process groups are killed) and join within ``timeout``."""
        with self._lock:
            self._closed = True
        self._cancel.set()
        if not self.wait_idle(timeout):
            log.warning("TensorFlow probes still running after %.1f s: %s", timeout, self.running())
