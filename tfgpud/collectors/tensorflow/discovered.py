"""Discovered envs on the probe schedule: the search on a thread of its own, and how the probe
of a discovered env runs — never with more privilege than the env's owner has.

:class:`EnvDiscovery` runs :func:`~tfgpud.collectors.discovery.discover_envs` at start and every
``[tensorflow.discover] interval_seconds``, timed as the collector ``discovery``; a poll only
reads its last result (:meth:`EnvDiscovery.latest`), so a search never delays a poll.
``tfgpud doctor`` runs the same search once (:meth:`EnvDiscovery.run_once`).

:func:`probe_target` probes one env of the schedule: a configured env as configured; a
discovered one as :func:`discovered_plan` allows. Before anything of a discovered env is
executed, who can write its code is read from file modes alone (the interpreter, its import
path, ``pyvenv.cfg``'s base install; the kernelspec when it sets variables), then
:func:`~tfgpud.collectors.discovery.plan_discovered_probe` decides: as its owner (tfgpud must be
root or hold CAP_SETUID and CAP_SETGID), as ``nobody`` when root owns it, as tfgpud itself only
when tfgpud is its owner (or it is root's and tfgpud cannot switch users) — and not at all when
anyone besides its owner can write it, when its kernelspec sets a variable that could point the
interpreter at unchecked code, or when the switch it needs is not possible. Then its result is
``not-run`` with the reason, and what its metadata shows is what is reported about it. The
probe itself then runs through :func:`~tfgpud.collectors.tensorflow.launch.probe_env` with
``run_as`` set to that user, whose full check (the interpreter's real ``sys.path``, asked as
that user) can still refuse it: that is reported as ``not-run`` too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from tfgpud.collectors.base import timed
from tfgpud.collectors.discovery import (
    DiscoveredEnv,
    DiscoveryResult,
    ProbeAs,
    ProbePlan,
    ProbeTarget,
    discover_envs,
    metadata_facts,
    plan_discovered_probe,
    searched_lines,
)
from tfgpud.collectors.tensorflow.safety import decide_probe_user, path_writers, root_forbidden_vars
from tfgpud.config import DiscoverConfig, TfEnvConfig
from tfgpud.model import (
    CollectorRun,
    DiscoverySummary,
    ProbeStatus,
    TfEnvRecord,
    TfProbeResult,
)

log = logging.getLogger("tfgpud.collectors.tensorflow")

# How long startup waits for the first search before its first poll (a search of the default
# roots reads ~60,000 entries/s cold): an env found later joins at the next poll.
FIRST_SEARCH_WAIT = 15.0

DiscoverFn = Callable[[DiscoverConfig], DiscoveryResult]
ProbeRun = Callable[[TfEnvConfig], TfProbeResult]


@dataclass(frozen=True)
class DiscoveryState:
    """The last search: its summary for the snapshot, the envs it kept, its collector record
    (None before the first search, and when discovery is off)."""

    summary: DiscoverySummary
    envs: tuple[DiscoveredEnv, ...] = ()
    run: CollectorRun | None = None


class EnvDiscovery:
    """Searches for TensorFlow envs at start and every ``interval_seconds`` on its own thread.

    A search that breaks (a bug: the search itself never raises for what it finds) keeps the
    envs found before; its collector record says it failed. With ``enabled = false`` nothing
    is searched and :meth:`latest` says so.
    """

    def __init__(
        self,
        settings: DiscoverConfig,
        *,
        discover: DiscoverFn = discover_envs,
        on_result: Callable[[], None] | None = None,
        carry: DiscoveryState | None = None,
    ) -> None:
        """``carry``: the last search of the discovery this one replaces (a reload changed
        the settings); it stands until this one's first search ends, so the envs it found are
        not dropped from the schedule, and probed anew, for the seconds that search takes."""
        self.settings = settings
        self._discover = discover
        self._on_result = on_result  # called on the search's thread after each search
        self._lock = threading.Lock()
        self._state = DiscoveryState(DiscoverySummary(enabled=settings.enabled))
        if settings.enabled and carry is not None and carry.summary.enabled:
            self._state = carry
        self._stop = threading.Event()
        self._first = threading.Event()
        self._thread: threading.Thread | None = None
        if not settings.enabled:
            self._first.set()

    def run_once(self) -> DiscoveryState:
        """Search now, on the caller's thread; return (and keep) the new state."""
        if not self.settings.enabled:
            return self.latest()
        result, run = timed("discovery", lambda: self._discover(self.settings))
        with self._lock:
            if result is None:
                self._state = replace(self._state, run=run)
            else:
                summary = DiscoverySummary(
                    enabled=True,
                    found=result.found,
                    searched=searched_lines(result),
                    finished_at=time.time(),
                )
                self._state = DiscoveryState(summary, result.envs, run)
            state = self._state
        self._first.set()
        if result is not None:
            log.info(
                "discovery: %d TensorFlow env(s) found (%d kept) in %.2f s, %d entries read, "
                "%d unreadable",
                result.found,
                len(result.envs),
                run.duration_seconds,
                result.entries_seen,
                result.unreadable,
            )
        return state

    def latest(self) -> DiscoveryState:
        with self._lock:
            return self._state

    def start(self) -> None:
        """Start the search thread (it searches at once); nothing when discovery is off."""
        if not self.settings.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="discovery", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            if self._on_result is not None and not self._stop.is_set():
                self._on_result()
            self._stop.wait(self.settings.interval_seconds)

    def wait_first(self, timeout: float) -> bool:
        """Wait until the first search has finished; False when ``timeout`` passed first."""
        return self._first.wait(timeout)

    def stop(self, timeout: float = 1.0) -> None:
        """End the thread; a search under way finishes on its own (bounded) and is dropped."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


# --- the probe of a discovered env ----------------------------------------------------------


def _ancestors(path: str) -> list[str]:
    p = Path(path)
    return [str(a) for a in reversed(p.parents)] + [str(p)]


def _file_writers(path: str) -> tuple[set[str], list[str]]:
    """Who besides root can change the file at ``path`` (or a directory above it, also along
    its symlink), with a line of evidence for each such path."""
    writers: set[str] = set()
    evidence: list[str] = []
    for p in dict.fromkeys(_ancestors(path) + _ancestors(os.path.realpath(path))):
        try:
            found = path_writers(os.lstat(p))
        except OSError:
            continue
        if found:
            writers |= found
            evidence.append(f"{p}: writable by {', '.join(sorted(found))}")
    return writers, evidence


def discovered_plan(
    target: ProbeTarget, *, switch: bool | None = None
) -> tuple[ProbePlan, tuple[str, ...], tuple[str, ...]]:
    """(plan, who besides root can write the env's code, evidence lines) for a discovered env.
    Reads file modes only: nothing of the env is executed."""
    env, config = target.discovered, target.config
    assert env is not None
    bad = root_forbidden_vars(config)
    if bad:
        reason = (
            f"its kernelspec {env.source} sets {', '.join(bad)}, which could make the "
            "interpreter run code nobody checked; configure the env in [[tensorflow.envs]] "
            "instead"
        )
        return ProbePlan(ProbeAs.NOT_RUN, None, reason), (), ()
    static = config.model_copy(update={"run_as": env.owner})
    decision = decide_probe_user(static, euid=0, query=None)
    if decision.refused is not None and not decision.writers:
        return ProbePlan(ProbeAs.NOT_RUN, None, decision.refused), (), ()
    writers = set(decision.writers)
    evidence = list(decision.evidence)
    if env.kernel_environment:  # its variables are the kernelspec's writers' choice
        more, lines = _file_writers(env.source)
        writers |= more
        evidence += lines
    plan = plan_discovered_probe(env, writers, switch=switch)
    return plan, tuple(sorted(writers)), tuple(evidence)


def probe_target(
    target: ProbeTarget, run: ProbeRun, *, switch: bool | None = None
) -> TfProbeResult:
    """Probe one env of the schedule with ``run`` (``probe_env`` with its timeout): a configured
    env as configured, a discovered one as :func:`discovered_plan` allows (see the module
    docstring). ``switch``: whether tfgpud can switch users (None: ask this process)."""
    if target.discovered is None:
        return run(target.config)
    env, config = target.discovered, target.config
    started = time.time()
    plan, writers, evidence = discovered_plan(target, switch=switch)
    if plan.how is ProbeAs.NOT_RUN:
        log.info("not probing discovered TensorFlow env %s: %s", config.name, plan.reason)
        return TfProbeResult(
            env=config.name,
            python=config.python,
            status=ProbeStatus.NOT_RUN,
            started_at=started,
            duration_seconds=time.time() - started,
            error=plan.reason,
            log_lines=evidence,
            refused_writers=writers,
        )
    user = plan.user
    if plan.how is ProbeAs.SELF:  # tfgpud is the owner, or root owns it and none can switch
        user = env.owner if env.owner_uid != 0 else None
    log.debug("discovered env %s: %s", config.name, plan.reason)
    result = run(config.model_copy(update={"run_as": user}))
    if result.status in (ProbeStatus.REFUSED, ProbeStatus.NO_ACCESS):
        # The full check (the real sys.path), the user switch or the path to the interpreter
        # stopped it: still not probed, and reported by its metadata like the above.
        return replace(result, status=ProbeStatus.NOT_RUN)
    return result


def env_record(target: ProbeTarget) -> TfEnvRecord:
    """What the snapshot keeps about an env of the schedule."""
    config, env = target.config, target.discovered
    if env is None:
        return TfEnvRecord(env=config.name, python=config.python, source=target.source.value)
    return TfEnvRecord(
        env=config.name,
        python=env.python,
        source=target.source.value,
        prefix=env.prefix,
        owner=env.owner or f"uid {env.owner_uid}",
        kind=env.kind.value,
        found_by=env.source,
        metadata=metadata_facts(env).lines,
    )
