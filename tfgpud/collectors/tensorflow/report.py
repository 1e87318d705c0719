"""The child's report → :class:`TfProbeResult`: whatever happened to the probe process (a
report, an import error, a crash, a hang, garbage, no permission) becomes one result.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from tfgpud.collectors.tensorflow.safety import access_denials
from tfgpud.config import TfEnvConfig
from tfgpud.model import (
    LibraryCheck,
    ProbeStatus,
    SearchDir,
    TfGpu,
    TfProbeResult,
    frozen_map,
)
from tfgpud.runner import RunResult
from tfgpud.text import user_name

MAX_LOG_LINES = 40


MAX_LOG_LINE_CHARS = 400
# The report comes from code the env's owner controls: every string, list and map in it is
# bounded, so one env cannot make the snapshot, /status or a label value grow without limit.
MAX_FIELD_CHARS = 4096
MAX_ITEMS = 256
MAX_PACKAGE_DIRS = 64  # stat()ed every poll for the install fingerprint


# Message texts worth keeping as evidence (docs/diagnosis-facts.md), matched case-insensitively
# on the message, never on the log prefix, which changes across TF versions.
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
        "Adding visible gpu devices",
        "not built with CUDA kernel binaries",
        "TensorFlow compiled with CUDA",
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


class _BadReport(ValueError):
    """The probe's JSON did not have the expected shape."""


def _opt_str(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value[:MAX_FIELD_CHARS]
    raise _BadReport(f"{what} is {type(value).__name__}, expected a string")


def _str_map(value: Any, what: str) -> Mapping[str, str]:
    if value is None:
        return frozen_map()
    if not isinstance(value, dict):
        raise _BadReport(f"{what} is {type(value).__name__}, expected an object")
    items = list(value.items())[:MAX_ITEMS]
    return frozen_map({str(k)[:MAX_FIELD_CHARS]: str(v)[:MAX_FIELD_CHARS] for k, v in items})


def _str_tuple(value: Any, what: str, limit: int = MAX_ITEMS) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _BadReport(f"{what} is {type(value).__name__}, expected a list")
    return tuple(str(v)[:MAX_FIELD_CHARS] for v in value[:limit])


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


def _opt_int(value: Any, what: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise _BadReport(f"{what} is {type(value).__name__}, expected an integer")


def _library(v: dict[str, Any]) -> LibraryCheck:
    others = v.get("other_versions") or []
    if not isinstance(others, list) or not all(isinstance(o, dict) for o in others):
        raise _BadReport("libraries[].other_versions is not a list of objects")
    return LibraryCheck(
        name=str(v.get("name", "?")),
        soname=str(v.get("soname", "?")),
        # other_versions entries carry no "loaded": they were opened if they have a path
        loaded=bool(v["loaded"]) if "loaded" in v else bool(v.get("path")),
        path=_opt_str(v.get("path"), "libraries[].path"),
        error=_opt_str(v.get("error"), "libraries[].error"),
        via=_opt_str(v.get("via"), "libraries[].via"),
        version=_opt_int(v.get("version"), "libraries[].version"),
        found_elsewhere=_str_tuple(v.get("found_elsewhere"), "libraries[].found_elsewhere"),
        other_versions=tuple(_library({"name": v.get("name"), **o}) for o in others),
    )


def _libraries(value: Any) -> tuple[LibraryCheck, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _BadReport("libraries is not a list of objects")
    return tuple(_library(v) for v in value)


def _loader(value: Any) -> tuple[str | None, tuple[SearchDir, ...]]:
    if value is None:
        return None, ()
    if not isinstance(value, dict):
        raise _BadReport("loader is not an object")
    search = value.get("search_path") or []
    if not isinstance(search, list) or not all(isinstance(e, dict) for e in search):
        raise _BadReport("loader.search_path is not a list of objects")
    dirs = tuple(SearchDir(str(e.get("dir", "")), str(e.get("source", "?"))) for e in search)
    return _opt_str(value.get("object"), "loader.object"), dirs


# TF's dso_loader at VLOG 1: "Could not load dynamic library 'libcusolver.so.11'; dlerror: ..."
_DLOPEN_FAILED = re.compile(r"Could not load dynamic library '([^']+)'; dlerror: ([^;\n]*)")
_DLOPEN_OK = re.compile(r"Successfully opened dynamic library (\S+)")


def loader_lines(stderr: bytes) -> tuple[dict[str, str], tuple[str, ...]]:
    """TensorFlow's own loader verdicts in its stderr: ({soname: dlerror} of the libraries it
    could not load, the sonames it opened). Bounded by the captured stderr."""
    text = stderr.decode("utf-8", errors="replace")
    failed: dict[str, str] = {}
    for m in _DLOPEN_FAILED.finditer(text):
        if len(failed) < 32:
            failed.setdefault(m.group(1), m.group(2).strip()[:MAX_LOG_LINE_CHARS])
    opened: list[str] = []
    for m in _DLOPEN_OK.finditer(text):
        if m.group(1) not in opened and len(opened) < 32:
            opened.append(m.group(1))
    return failed, tuple(opened)


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
    who = user or (user_name(os.geteuid()) or str(os.geteuid()))
    where = f": no search/execute permission on {', '.join(denied)}" if denied else ""
    return TfProbeResult(
        status=ProbeStatus.NO_ACCESS,
        error=f"user {who} may not execute {interpreter}{where} ({run.error})",
        log_lines=logs or _stderr_tail(run.stderr),
        probe_user=who,
        denied_paths=denied,
        **base,
    )


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
            "package_dirs": _str_tuple(data.get("package_dirs"), "package_dirs", MAX_PACKAGE_DIRS),
            "device_access": _str_map(data.get("device_access"), "device_access"),
            "smoke_ok": bool(smoke.get("ok")) if smoke is not None else None,
            "smoke_error": (
                _opt_str(smoke.get("error"), "smoke.error") if smoke is not None else None
            ),
            "smoke_stage": (
                _opt_str(smoke.get("stage"), "smoke.stage") if smoke is not None else None
            ),
        }
        fields_["loader_object"], fields_["loader_search"] = _loader(data.get("loader"))
        failed, opened = loader_lines(run.stderr)
        fields_["loader_failures"] = frozen_map(failed)
        fields_["loader_opened"] = opened
        import_error = _opt_str(data.get("import_error"), "import_error")
    except _BadReport as exc:
        return fail(ProbeStatus.BAD_OUTPUT, f"malformed probe report: {exc}")
    status = ProbeStatus.IMPORT_FAILED if import_error else ProbeStatus.OK
    return TfProbeResult(status=status, error=import_error, log_lines=logs, **fields_, **base)
