"""Start the probe child: the interpreter and user (after the safety check), a clean explicit
environment, a private HOME for root, bounded output; the run goes through :mod:`tfgpud.runner`.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from tfgpud.collectors.tensorflow.report import parse_probe_run
from tfgpud.collectors.tensorflow.safety import SAFE_PATH, decide_probe_user, resolve_interpreter
from tfgpud.config import TfEnvConfig
from tfgpud.model import (
    ProbeStatus,
    TfProbeResult,
)
from tfgpud.runner import MIB, RunResult, run_bounded

log = logging.getLogger("tfgpud.collectors.tensorflow")

# Run by path, so its directory is sys.path[0] in the env: child/ holds only the probe.
PROBE_SCRIPT = Path(__file__).resolve().parent / "child" / "tfprobe.py"


MAX_OUTPUT = MIB  # a real report is ~5 KB; anything near 1 MiB is not a report


# Variables that must never reach the probe: it is not the daemon's systemd service.
_FORBIDDEN_ENV = re.compile(r"^(NOTIFY_SOCKET|WATCHDOG_\w*|LISTEN_\w*)$")


def probe_environment(
    env: TfEnvConfig, *, home: str | None = None, user_site: bool = True
) -> dict[str, str]:
    """The complete environment a probe of ``env`` gets: clean, explicit, nothing inherited.

    PATH (the env's bin dir first, as activation would), HOME (``home``, else ``/``: never the
    caller's), LANG, then the env's ``environment`` table, then TF_CPP_MIN_LOG_LEVEL=0 so TF's
    diagnostics are never hidden and TF_CPP_MAX_VLOG_LEVEL=1 so its loader names each library
    it cannot load (a few dozen lines more, no higher level), and PYTHONNOUSERSITE=1 unless
    ``user_site``.
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
    result["TF_CPP_MAX_VLOG_LEVEL"] = "1"
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
    :mod:`tfgpud.collectors.tensorflow.safety`). A child not run as a named user gets ``python -s``,
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
