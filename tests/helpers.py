"""Shared test helpers: the simulated NVIDIA driver (tests/fakedriver) and fresh processes.

Typical use::

    from helpers import run_python, write_scenario

    write_scenario(path, gpus=[{"name": "NVIDIA H100 80GB HBM3", "lost": True}], init_error=None)
    result = run_python("import pynvml, json; ...; print(json.dumps(...))", scenario=path)
    assert result.data == ...

Scenario keys are documented in tests/fakedriver/README.md. The libraries re-read the file
whenever it changes, so a test changes the simulated machine by calling write_scenario again.
"""

from __future__ import annotations

import ast
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tfgpud.codes import CODES

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
FAKEDRIVER_SRC = TESTS_DIR / "fakedriver"
FAKEDRIVER_DIR = REPO_ROOT / "build" / "fakedriver"

ScenarioValue = str | int | bool | Iterable[int] | None


def build_fakedriver(out: Path = FAKEDRIVER_DIR, *, check_tools: bool = False) -> Path:
    """Build libnvidia-ml.so.1 and libcuda.so.1 into `out` (idempotent: make decides).

    With check_tools, also build `scenario-check` (the parser under ASan/UBSan).
    """
    targets = ["all", "check-tools"] if check_tools else ["all"]
    proc = subprocess.run(
        ["make", "-s", "-C", str(FAKEDRIVER_SRC), f"OUT={out}", *targets],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"building the fake driver failed:\n{proc.stdout}\n{proc.stderr}")
    return out


def _toml_string(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(key: str, value: ScenarioValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, Iterable):
        items = list(value)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise TypeError(f"scenario key {key!r}: arrays may only hold integers")
        return "[" + ", ".join(str(v) for v in items) + "]"
    raise TypeError(f"scenario key {key!r}: unsupported value {value!r}")


def _table(values: Mapping[str, ScenarioValue]) -> list[str]:
    return [f"{k} = {_toml_value(k, v)}" for k, v in values.items() if v is not None]


def render_scenario(gpus: Iterable[Mapping[str, ScenarioValue]] = (), **top: ScenarioValue) -> str:
    """Render a scenario as TOML text.

    `top` holds the top-level keys (driver_version, cuda_driver_version, nvml_version,
    init_error, cuda_init_error); each mapping in `gpus` becomes one [[gpu]] table. Keys whose
    value is None are left out, so the library's default applies.
    """
    lines = ["# tfgpud fake driver scenario (written by tests/helpers.py)", *_table(top)]
    for gpu in gpus:
        lines += ["", "[[gpu]]", *_table(gpu)]
    return "\n".join(lines) + "\n"


def write_text_atomically(path: Path, text: str | bytes) -> Path:
    """Replace `path` atomically (temp file, fsync, rename) and make its mtime move forward.

    A reader sees either the old or the new file; the new one always differs from the old in
    inode and in mtime (bumped by at least 1 ms even on a coarse-clock filesystem).
    """
    path = Path(path)
    data = text.encode() if isinstance(text, str) else text
    try:
        old_mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        old_mtime = 0
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    mtime = max(time.time_ns(), old_mtime + 1_000_000)
    os.utime(tmp, ns=(mtime, mtime))
    os.replace(tmp, path)
    return path


def write_scenario(
    path: Path, gpus: Iterable[Mapping[str, ScenarioValue]] = (), **top: ScenarioValue
) -> Path:
    """Write a scenario (see render_scenario) to `path` atomically. Returns `path`."""
    return write_text_atomically(Path(path), render_scenario(gpus, **top))


def fakedriver_env(
    scenario: Path | str | None,
    *,
    libdir: Path = FAKEDRIVER_DIR,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for a child process that should talk to the fake driver.

    Based on os.environ without any inherited TFGPUD_FAKE_DRIVER*/CUDA_VISIBLE_DEVICES;
    LD_LIBRARY_PATH is the fake driver's directory only; PYTHONPATH includes tests/ so that a
    child can `import helpers`. scenario=None leaves TFGPUD_FAKE_DRIVER unset.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TFGPUD_FAKE_DRIVER") and k != "CUDA_VISIBLE_DEVICES"
    }
    env["LD_LIBRARY_PATH"] = str(libdir)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p
    )
    if scenario is not None:
        env["TFGPUD_FAKE_DRIVER"] = str(scenario)
    env.update(extra or {})
    return env


@dataclass
class PythonResult:
    returncode: int
    stdout: str
    stderr: str
    data: Any  # the JSON on the last line of stdout, None when there is none

    def fakedriver_lines(self) -> list[str]:
        """The fake driver's own stderr lines (trace lines excluded)."""
        return [
            line
            for line in self.stderr.splitlines()
            if line.startswith("fakedriver: ") and not line.startswith("fakedriver: trace: ")
        ]


def run_python(
    code: str,
    *,
    scenario: Path | str | None,
    libdir: Path = FAKEDRIVER_DIR,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 60.0,
) -> PythonResult:
    """Run `code` in a fresh Python process that loads the fake driver.

    The snippet reports by printing one JSON document as the last line of stdout; it is parsed
    into `.data`. The child is killed if it outlives `timeout`.
    """
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=fakedriver_env(scenario, libdir=libdir, extra=env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    data = None
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if lines:
        try:
            data = json.loads(lines[-1])
        except json.JSONDecodeError:
            data = None
    return PythonResult(proc.returncode, proc.stdout, proc.stderr, data)


# Every finding code, from the one table of codes.
ALL_CODES = list(CODES)


def emitted_codes() -> set[str]:
    """The codes the rules in tfgpud/diagnosis/ can emit: each first argument of a
    ``finding("code", ...)`` call and each ``TfCheck("code", ...)`` row, read from the source."""
    found: set[str] = set()
    for path in sorted((REPO_ROOT / "tfgpud" / "diagnosis").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            first = node.args[0]
            if name in ("finding", "TfCheck") and isinstance(first, ast.Constant):
                found.add(str(first.value))
    return found


def parse_journal_entry(data: bytes) -> dict[str, str]:
    """A journald native-protocol datagram as journald reads it: ``KEY=value`` lines, or for a
    value holding a newline ``KEY``, a newline, a 64-bit little-endian length, the bytes, a
    newline."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        if b"=" in data[i:nl]:
            key, value = data[i:nl].split(b"=", 1)
            i = nl + 1
        else:
            key = data[i:nl]
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            value = data[nl + 9 : nl + 9 + size]
            if data[nl + 9 + size : nl + 10 + size] != b"\n":
                raise ValueError(f"field {key!r}: no newline after its {size} bytes")
            i = nl + 10 + size
        fields[key.decode()] = value.decode(errors="replace")
    return fields


def fake_tf_python(
    path: Path, gpus: int, *, report: Mapping[str, Any] | None = None, stderr: bytes = b""
) -> Path:
    """An executable at ``path`` that answers the TF probe like tfprobe.py would from an env
    whose TensorFlow 2.21 (CUDA 12.5 build) lists ``gpus`` GPUs, without importing anything.

    ``report`` overrides fields of the report; ``stderr`` is written to stderr as it is (TF's
    log lines, or whatever a hostile env prints).
    """
    doc: dict[str, Any] = {
        "schema": 1,
        "tf_version": "2.21.0",
        "python": {"version": "3.11.2"},
        "build_info": {"is_cuda_build": "True", "cuda_version": "12.5.1", "cudnn_version": "9"},
        "gpus": [{"name": f"/physical_device:GPU:{i}"} for i in range(gpus)],
        **(report or {}),
    }
    out = path.with_name(path.name + ".report.json")
    out.write_text(json.dumps(doc))
    err = path.with_name(path.name + ".stderr")
    err.write_bytes(stderr)
    path.write_text(f"#!/bin/sh\ncat '{err}' >&2\ncat '{out}'\n")
    path.chmod(0o755)
    return path


def finding_value(metrics: Mapping[str, float], code: str, subject: str) -> float | None:
    """The value of ``tfgpud_finding`` for ``code`` and ``subject``, whatever other labels it
    carries (cause, role, host, severity); None when there is no such series."""
    want = (f'code="{code}"', f'subject="{subject}"')
    for key, value in metrics.items():
        if key.startswith("tfgpud_finding{") and all(w in key for w in want):
            return value
    return None
