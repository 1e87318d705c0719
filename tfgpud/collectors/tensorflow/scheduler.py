"""When each env is probed: at start, on change (driver, GPU inventory, the env's install), on a
slow interval, with retries; probes run on worker threads so none delays a poll or a scrape.
The schedule is the configured envs plus the discovered ones, which come and go with each
search (:meth:`TfProbeScheduler.set_discovered`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tfgpud.collectors.discovery import DiscoveredEnv, EnvSource, ProbeTarget, merge_envs
from tfgpud.collectors.tensorflow.discovered import env_record, probe_target
from tfgpud.collectors.tensorflow.launch import probe_env
from tfgpud.config import TensorflowConfig, TfEnvConfig
from tfgpud.model import (
    NvmlReading,
    ProbeStatus,
    TfEnvRecord,
    TfProbeResult,
)
from tfgpud.runner import abandoned_children, deadline_scope

log = logging.getLogger("tfgpud.collectors.tensorflow")


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


# Linux stamps mtimes from its coarse wall clock (one tick, a few ms, behind the fine one);
# Python names no constant for that clock.
_CLOCK_REALTIME_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)


def coarse_now_ns() -> int:
    """The wall clock that file mtimes come from: a write after this reads has an mtime at or
    after it."""
    try:
        return time.clock_gettime_ns(_CLOCK_REALTIME_COARSE)
    except OSError:  # not Linux: the fine clock, less a generous tick
        return time.time_ns() - 20_000_000


def changed_during(fingerprint: Fingerprint, start_ns: int, end_ns: int) -> Fingerprint:
    """``fingerprint`` with each path whose mtime lies in [start_ns, end_ns] (from
    :func:`coarse_now_ns`, then ``time.time_ns()``) marked as unseen: pip wrote there while
    the probe ran, so the result may predate it, and the next poll must see a change and probe
    again. A write in the same clock tick just before the start also counts: one probe more."""
    return tuple(
        (p, -1) if mtime is not None and start_ns <= mtime <= end_ns else (p, mtime)
        for p, mtime in fingerprint
    )


def driver_fingerprint(nvml: NvmlReading) -> tuple[str | None, frozenset[str]]:
    """What about the driver changes TF's answer: its version and the set of GPU UUIDs."""
    return (nvml.driver_version, frozenset(g.uuid for g in nvml.gpus))


# Probes for a change: up to CHANGE_BURST at once, then one per CHANGE_REFILL_SECONDS while
# changes keep coming (a token bucket per env).
CHANGE_BURST = 10
CHANGE_REFILL_SECONDS = 300.0


# REFUSED, NO_ACCESS and NOT_RUN are fixed by chown/chmod/setfacl, which change no mtime; an
# IMPORT_FAILED env may get TensorFlow installed (also caught by the site dirs' mtimes).
_RETRY_STATUSES = frozenset(
    {
        ProbeStatus.TIMEOUT,
        ProbeStatus.CRASHED,
        ProbeStatus.ERROR,
        ProbeStatus.BAD_OUTPUT,
        ProbeStatus.REFUSED,
        ProbeStatus.NO_ACCESS,
        ProbeStatus.NOT_RUN,
        ProbeStatus.IMPORT_FAILED,
        ProbeStatus.MISSING_INTERPRETER,
    }
)


@dataclass
class _EnvState:
    env: TfEnvConfig
    target: ProbeTarget
    record: TfEnvRecord
    started: float | None = None  # caller's (monotonic) clock, at the last start
    driver: tuple[str | None, frozenset[str]] | None = None  # at the last start
    installed: Fingerprint | None = None  # after the last finished probe (-1: changed during it)
    result: TfProbeResult | None = None
    thread: threading.Thread | None = None
    abandoned_pid: int | None = None  # the last probe's child, killed but not yet gone
    runs: int = 0
    reasons: list[str] = field(default_factory=list)
    change_tokens: float = float(CHANGE_BURST)  # change-triggered probes allowed now
    tokens_at: float | None = None  # caller's clock when change_tokens was last refilled
    # A reload's schedule waits for the old schedule's probe of this env (``thread``); that
    # probe lands its killed-but-stuck child in the old state, read from here once it ended.
    adopted_from: _EnvState | None = None


def _state(target: ProbeTarget) -> _EnvState:
    return _EnvState(target.config, target, env_record(target))


def _owner_uid(target: ProbeTarget) -> int | None:
    return target.discovered.owner_uid if target.discovered is not None else None


class TfProbeScheduler:
    """Decides when each env is probed and runs the probes on background threads.

    Due: at start; every ``interval`` s; after a failed probe (timeout, crash, bad output)
    every ``retry_seconds``; and when the driver version, the NVML GPU set, or the env's
    installed TensorFlow/nvidia packages changed: at once for up to ``CHANGE_BURST`` changes,
    then once per ``CHANGE_REFILL_SECONDS`` while changes keep coming. Never two probes of one
    env at once (nor while the previous probe's killed child still exists), and at most
    ``max_concurrent`` probes at once across envs (the others wait for a later call).
    Methods are safe to call from one controlling thread while probes run. ``switch``: whether
    this process can switch users, for the plan of a discovered env's probe (None: ask).
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
        switch: bool | None = None,
    ) -> None:
        self._on_result = on_result  # called on the probe's thread after each result lands
        self._configured = tuple(envs)
        self._discovered: tuple[DiscoveredEnv, ...] = ()
        self._states = {e.name: _state(ProbeTarget(e, EnvSource.CONFIGURED)) for e in envs}
        # Probes of envs dropped from the schedule while running: they finish unseen.
        self._retired: list[threading.Thread] = []
        self._switch = switch
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

    def _change(self, st: _EnvState, nvml: NvmlReading | None) -> str | None:
        """What changed since the env's last probe that changes TF's answer, if anything."""
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
        return None

    def _due(self, st: _EnvState, nvml: NvmlReading | None, now: float) -> str | None:
        if st.started is None:
            return "first probe"
        elapsed = now - st.started
        change = self._change(st, nvml)
        if change is not None:
            # A token per change-triggered probe: a burst of changes (break, fix, break again)
            # is probed at once each; changes that keep coming (a driver that flaps, a script
            # rewriting site-packages) are probed once per CHANGE_REFILL_SECONDS.
            if st.tokens_at is not None:
                refill = (now - st.tokens_at) / CHANGE_REFILL_SECONDS
                st.change_tokens = min(float(CHANGE_BURST), st.change_tokens + refill)
            st.tokens_at = now
            if st.change_tokens >= 1.0:
                st.change_tokens -= 1.0
                return change
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
            ) + sum(1 for t in self._retired if t.is_alive())
            lingering = abandoned_children()
            for name, st in self._states.items():
                if busy >= self._max_concurrent:
                    break
                if st.thread is not None and st.thread.is_alive():
                    continue
                if st.adopted_from is not None:
                    st.abandoned_pid = st.adopted_from.abandoned_pid
                    st.adopted_from = None
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
        start_ns = coarse_now_ns()
        try:
            # The pre-check (as root) shares the probe's timeout and is cancelled with it.
            with deadline_scope(self._timeout, self._cancel):
                result = probe_target(
                    st.target,
                    lambda env: self._probe(env, timeout=self._timeout, cancel=self._cancel),
                    switch=self._switch,
                )
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
        fingerprint = changed_during(install_fingerprint(paths), start_ns, time.time_ns())
        with self._lock:
            st.abandoned_pid = result.abandoned_pid
            if self._cancel.is_set() and result.status is not ProbeStatus.OK:
                # Cut short by a reload or a stop, it says nothing of the env: the last
                # finished result stands (a reload's schedule adopts it) and it is due anew.
                st.started = None
                cut_short = True
            else:
                st.result, st.installed = result, fingerprint
                cut_short = False
        if cut_short:
            log.info("probe of TensorFlow env %s cancelled: %s", st.env.name, result.error)
            return
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

    def env_records(self) -> tuple[TfEnvRecord, ...]:
        """Every env on the schedule, configured first, probed or not."""
        with self._lock:
            return tuple(st.record for st in self._states.values())

    def set_discovered(self, envs: Sequence[DiscoveredEnv]) -> None:
        """Make the schedule the configured envs plus ``envs`` (``merge_envs``: a configured env
        wins over a discovered one with the same interpreter). A new env is due at once; one no
        longer found is dropped with its result, so its series and findings end (a probe of it
        still running finishes unseen). An env whose interpreter or owner changed is new."""
        found = tuple(envs)
        with self._lock:
            if found == self._discovered or self._closed:
                return
            self._discovered = found
            states: dict[str, _EnvState] = {}
            for target in merge_envs(self._configured, found):
                name = target.config.name
                st = self._states.get(name)
                if (
                    st is None
                    or st.env != target.config
                    or _owner_uid(st.target) != _owner_uid(target)
                ):
                    st = _state(target)
                    log.info(
                        "TensorFlow env %s discovered: %s (owner %s)",
                        name,
                        st.record.prefix,
                        st.record.owner,
                    )
                else:  # the same env: its metadata may have changed, its schedule has not
                    st.target, st.record = target, env_record(target)
                states[name] = st
            for name, old in self._states.items():
                if states.get(name) is old:
                    continue
                if name not in states:
                    log.info("TensorFlow env %s is no longer found: its series end", name)
                if old.thread is not None and old.thread.is_alive():
                    self._retired.append(old.thread)
            self._retired = [t for t in self._retired if t.is_alive()]
            self._states = states

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
            threads += self._retired
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)

    def adopt(self, old: TfProbeScheduler) -> None:
        """Carry over the last results (and schedule) of envs whose configuration is unchanged,
        so a reload does not blank their metrics and findings until they are probed again.
        A probe still running in ``old`` (cancelled with it: :meth:`cancel`) is waited for
        here, never by the caller: its env is probed anew once it has ended, and it counts
        against ``max_concurrent`` until then."""
        with old._lock, self._lock:
            for name, st in self._states.items():
                prev = old._states.get(name)
                if prev is None:
                    continue
                running = prev.thread is not None and prev.thread.is_alive()
                # The state that probe's thread writes to: an earlier schedule's when ``old``
                # itself adopted it (two reloads while it ran) and has not read it back yet.
                src = prev.adopted_from or prev
                if running:
                    st.thread = prev.thread  # waited for; then due anew (started stays None)
                    st.adopted_from = src
                else:
                    st.abandoned_pid = src.abandoned_pid  # its stuck child holds it back still
                if prev.env != st.env or prev.result is None:
                    continue
                if not running:
                    st.started = prev.started
                st.driver, st.installed = prev.driver, prev.installed
                st.result, st.runs = prev.result, prev.runs
                st.change_tokens, st.tokens_at = prev.change_tokens, prev.tokens_at
            mine = {st.thread for st in self._states.values()}
            self._retired += [
                t
                for t in (*(st.thread for st in old._states.values()), *old._retired)
                if t is not None and t.is_alive() and t not in mine
            ]

    def cancel(self) -> None:
        """Stop starting probes and cancel the running ones (their process groups are killed);
        returns at once."""
        with self._lock:
            self._closed = True
        self._cancel.set()

    def close(self, timeout: float = 2.0) -> None:
        """Cancel running probes (their process groups are killed) and join within ``timeout``."""
        self.cancel()
        if not self.wait_idle(timeout):
            log.warning("TensorFlow probes still running after %.1f s: %s", timeout, self.running())
