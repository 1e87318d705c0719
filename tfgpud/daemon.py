"""The daemon's lifecycle: startup() → main_loop() → shutdown().

Signal handlers only set flags; the loop thread does all the work. The loop is the heartbeat:
WATCHDOG=1 is sent from it, so a hung poll stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

from tfgpud import __version__
from tfgpud.alerts import AlertDispatcher
from tfgpud.collectors.base import timed
from tfgpud.collectors.nvml import NvmlSession, XidWatcher
from tfgpud.collectors.pci import PciCache, collect_pci
from tfgpud.collectors.tensorflow import TfProbeScheduler
from tfgpud.collectors.tensorflow.discovered import FIRST_SEARCH_WAIT, EnvDiscovery
from tfgpud.collectors.workloads import WorkloadScanner
from tfgpud.config import Config, ConfigError, load_config, parse_listen
from tfgpud.diagnosis import diagnose
from tfgpud.exporter import Exposition, export_options, make_registry
from tfgpud.model import CollectorRun, KnownGpu, NvmlReading, Snapshot
from tfgpud.poll import Expected, PressureTracker, Readings, build_snapshot
from tfgpud.recurring import Recurring
from tfgpud.runner import become_subreaper
from tfgpud.server import Endpoints, HttpServer, raise_open_files_limit
from tfgpud.state import Baseline
from tfgpud.systemd import Notifier
from tfgpud.views import status_document, summarize
from tfgpud.webconfig import WebConfigError, WebSecurity, load_web_config

log = logging.getLogger(__name__)


def name_threads(named: set[int]) -> None:
    """Give each Python thread its name in the kernel too (``/proc/PID/task/TID/comm``: what
    ``top -H``, ``ps -L`` and the benchmarks show), so the cost of each thread can be told apart.
    The main thread keeps the process's name. ``named`` holds the thread ids done before (only
    new threads are written; ids of threads gone are dropped, the kernel reuses them)."""
    threads = threading.enumerate()
    named.intersection_update(t.native_id for t in threads)
    for t in threads:
        tid = t.native_id
        if tid is None or tid in named or t is threading.main_thread():
            continue
        named.add(tid)
        try:
            with open(f"/proc/self/task/{tid}/comm", "w", encoding="utf-8") as f:
                f.write(t.name.encode()[:15].decode("utf-8", "ignore"))  # the kernel keeps 15
        except OSError:
            pass  # the thread ended meanwhile, or /proc is not ours to write


class StartupError(Exception):
    """The daemon cannot start (e.g. the port is taken). The message is for a person."""


@dataclass(frozen=True)
class HostPaths:
    """Roots of the host filesystems the collectors read (fixture trees in tests)."""

    sys: Path = Path("/sys")
    proc: Path = Path("/proc")
    dev: Path = Path("/dev")


class Daemon:
    """One tfgpud process. Construct, then ``run()``; returns the exit code."""

    def __init__(
        self,
        config: Config,
        config_path: str | None = None,
        paths: HostPaths | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.paths = paths or HostPaths()
        self.notifier = Notifier(environ)
        self.host = socket.gethostname()
        self._snapshot: Snapshot | None = None
        self._wake = threading.Event()
        self._stop_requested = False
        self._reload_requested = False
        self._probe_landed = False
        self._last_poll_end = 0.0
        self._last_status = ""
        self._pressure = PressureTracker()
        self._state = Baseline.open(config.daemon.state_dir, config.expect.gpus)
        self._alerts = AlertDispatcher(config.alerts, Path(config.daemon.state_dir), self.host)
        self._nvml = NvmlSession(config.nvml.library, proc_root=self.paths.proc)
        self._workloads = WorkloadScanner(self.paths.proc)
        self._xids = XidWatcher(self._nvml)
        self._tf = TfProbeScheduler.from_config(config.tensorflow, on_result=self._on_probe_result)
        self._discovery = EnvDiscovery(config.tensorflow.discover, on_result=self._on_probe_result)
        self._registry = make_registry(
            lambda: self._snapshot, lambda: export_options(self.config, self._alerts.instance)
        )
        self._exposition = Exposition(self._registry, lambda: self._snapshot)
        self._http: HttpServer | None = None
        self._named: set[int] = set()  # thread ids given their name (name_threads)
        self._failures = Recurring(log, logging.ERROR)  # poll glue failing at every poll
        self._pci_cache = PciCache()  # what cannot have changed since the last poll
        self.polls = 0

    # -- signals -----------------------------------------------------------------------------

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stop_requested = True
        self._wake.set()

    def _on_probe_result(self) -> None:
        # A TensorFlow probe (or a search for envs) finished on its thread: diagnose it now,
        # not at the next tick.
        self._probe_landed = True
        self._wake.set()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._reload_requested = True
        self._wake.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    def request_stop(self) -> None:
        self._stop_requested = True
        self._wake.set()

    # -- endpoints -----------------------------------------------------------------------------

    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def health(self) -> tuple[bool, str]:
        if self._snapshot is None:
            return False, "starting: no poll completed yet"
        age = time.monotonic() - self._last_poll_end
        limit = max(3 * self.config.daemon.interval_seconds, 30.0)
        if age > limit:
            return False, f"poll loop stalled: last poll {age:.0f}s ago (limit {limit:.0f}s)"
        return True, f"ok: last poll {age:.1f}s ago"

    def endpoints(self) -> Endpoints:
        return Endpoints(
            registry=self._registry,
            exposition=self._exposition,
            health=self.health,
            status=lambda: status_document(self._snapshot, self.host),
        )

    # -- polling -------------------------------------------------------------------------------

    def _baseline(self, nvml: NvmlReading | None, now: float) -> tuple[tuple[KnownGpu, ...], int]:
        """The GPUs expected: the persisted baseline (re-read when `tfgpud baseline` changed it)
        plus the GPUs seen now, written back atomically when its membership changed."""
        self._state.expect = self.config.expect.gpus
        self._state.refresh()
        if self._state.learn(nvml, now):
            with self._state.lock():
                self._state.refresh()  # a CLI change since the line above wins, then re-learn
                self._state.learn(nvml, now)
                self._state.save_quietly(now)
        self._state.flush_if_dirty(now)  # a write that failed earlier is retried (backoff 30 s)
        return self._state.gpus, self._state.expected

    def poll_once(self) -> Snapshot:
        """Run every collector, diagnose, publish the snapshot. Never raises.

        Collectors already cannot raise; this guards the glue (baseline, alerts, a bug): the
        previous snapshot is republished with ``collector="poll"`` failing, so the loop keeps
        beating and TfgpudCollectorFailing tells someone.
        """
        now = time.time()
        try:
            return self._poll(now)
        except Exception as exc:  # noqa: BLE001 - logged by Recurring
            self._failures.failed("poll", "poll failed", exc)
            prev = self._snapshot or Snapshot(taken_at=now)
            failed = CollectorRun("poll", False, 0.0, f"{type(exc).__name__}: {exc}")
            kept = tuple(r for r in prev.collectors if r.name != "poll")
            snap = replace(prev, taken_at=now, sequence=self.polls + 1, collectors=(*kept, failed))
            self._publish(snap)
            return snap

    def _publish(self, snap: Snapshot) -> None:
        self._snapshot = snap
        self._last_poll_end = time.monotonic()
        self.polls += 1

    def _poll(self, now: float) -> Snapshot:
        runs: list[CollectorRun] = []
        pci, run = timed(
            "pci",
            lambda: collect_pci(self.paths.sys, self.paths.proc, self.paths.dev, self._pci_cache),
        )
        runs.append(run)
        nvml, run = timed("nvml", self._nvml.poll)
        runs.append(run)
        if nvml is not None:
            self._xids.watch(g.uuid for g in nvml.gpus if not g.lost)
        found = self._discovery.latest()  # the search runs on its own thread, never here
        if found.run is not None:
            runs.append(found.run)
        self._tf.set_discovered(found.envs)
        _, run = timed("tensorflow", lambda: self._tf.maybe_start(nvml, time.monotonic()))
        runs.append(run)
        workloads = None
        if self.config.workloads.enabled:
            names = self.config.workloads.process_names
            workloads, run = timed("workloads", lambda: self._workloads.scan(nvml, now, names))
            runs.append(run)
        xids = self._xids.view()
        readings = Readings(
            taken_at=now,
            pci=pci,
            nvml=nvml,
            tf=self._tf.results(),
            collectors=tuple(runs),
            workloads=workloads,
            xid_counts=xids.counts,
            xid_events=xids.events,
            tf_envs=self._tf.env_records(),
            discovery=found.summary,
        )
        known, expected = self._baseline(nvml, now)
        snap = build_snapshot(
            readings,
            Expected(known, expected, self._state.problems()),
            self._pressure,
            self.config.memory.pressure_ratio,
            sequence=self.polls + 1,
        )
        try:
            findings = diagnose(snap, self.config)
            self._failures.ok("diagnosis")
        except Exception as exc:  # noqa: BLE001 - logged by Recurring
            self._failures.failed("diagnosis", "diagnosis failed", exc)
            findings = ()
        snap = replace(snap, findings=findings, alert_stats=self._alerts.process(findings, now))
        self._publish(snap)
        self._failures.ok("poll")
        return snap

    # -- lifecycle -----------------------------------------------------------------------------

    def startup(self) -> None:
        """Bind the port, do the first poll, start serving, then READY=1."""
        host, port = parse_listen(self.config.http.listen)
        security: WebSecurity | None = None
        if self.config.http.web_config_file:
            try:
                security = WebSecurity.from_file(self.config.http.web_config_file)
            except WebConfigError as exc:  # `tfgpud run` checked it; it changed since
                raise StartupError(exc.render()) from None
        try:
            self._http = HttpServer(host, port, self.endpoints(), security=security)
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {self.config.http.listen}: {exc.strerror or exc}. "
                "Another process may hold the port (see `ss -ltnp`), or the address is not "
                "on this host; set [http] listen in the configuration to a free HOST:PORT."
            ) from None
        self._xids.start()
        self._alerts.start()
        self._discovery.start()
        if not self._discovery.wait_first(FIRST_SEARCH_WAIT):
            log.info(
                "discovery still searching after %.0f s: its envs join later", FIRST_SEARCH_WAIT
            )
        snap = self.poll_once()
        self._http.start()
        name_threads(self._named)
        addr = self._http.address
        scheme = self._http.scheme
        log.info(
            "tfgpud %s serving on %s://%s:%d/ — %s", __version__, scheme, *addr, summarize(snap)
        )
        self._last_status = summarize(snap)
        self.notifier.ready(self._last_status)

    def _reload(self) -> None:
        self._reload_requested = False
        self.notifier.reloading()
        if self.config_path is None:
            log.warning("SIGHUP: no configuration file to re-read")
        else:
            try:
                new = load_config(self.config_path)
                if new.http.web_config_file:  # refused as `tfgpud run` would refuse it
                    load_web_config(new.http.web_config_file)
            except ConfigError as exc:
                log.error("reload failed; keeping the running configuration. %s", exc.render())
            else:
                self._apply(new)
        self.notifier.send(READY=1, STATUS=self._last_status or "reloaded")

    def _apply(self, new: Config) -> None:
        old = self.config
        if new.http != old.http:
            log.warning("[http] changed: takes effect on restart")
        if new.nvml != old.nvml:
            log.warning("[nvml] changed: takes effect on restart")
        if new.daemon.log_level != old.daemon.log_level:
            logging.getLogger().setLevel(new.daemon.log_level.upper())
        if new.tensorflow.discover != old.tensorflow.discover:
            self._discovery.stop(0.2)
            self._discovery = EnvDiscovery(
                new.tensorflow.discover,
                on_result=self._on_probe_result,
                carry=self._discovery.latest(),
            )
            self._discovery.start()
        if new.tensorflow != old.tensorflow:
            # Cancelled, not waited for: a probe takes a moment to die (a switched-user one a
            # helper process), and this loop is the watchdog's heartbeat. The new schedule
            # takes over the old probes' threads and waits for them itself.
            previous = self._tf
            previous.cancel()
            self._tf = TfProbeScheduler.from_config(new.tensorflow, on_result=self._on_probe_result)
            self._tf.set_discovered(self._discovery.latest().envs)
            self._tf.adopt(previous)
        if new.daemon.state_dir != old.daemon.state_dir or new.expect != old.expect:
            self._state.close()
            self._state = Baseline.open(new.daemon.state_dir, new.expect.gpus)
        if new.alerts != old.alerts or new.daemon.state_dir != old.daemon.state_dir:
            # Firing alerts and undelivered messages live in state_dir/alerts.json (saved by
            # stop()), so the new dispatcher carries them on; sinks are matched by URL.
            # The fire/resolve timers are not in the file: they are taken over in memory.
            replaced = self._alerts
            replaced.stop(0.5)
            self._alerts = AlertDispatcher(new.alerts, Path(new.daemon.state_dir), self.host)
            self._alerts.transitions.carry(replaced.transitions)
            self._alerts.start()
            log.info("alert sinks reconfigured: %d sink(s)", len(self._alerts.workers))
        self.config = new
        log.info("configuration reloaded from %s", self.config_path)

    def main_loop(self) -> None:
        """Sleep until the next poll (or a signal, or a landed probe); poll; repeat.

        WATCHDOG=1 goes out with a poll whenever the next ping would fall due before the next
        poll, so at the default interval the pings cost no wake-up of their own; only an
        interval longer than the ping period adds wake-ups for pings in between.
        """
        interval = self.config.daemon.interval_seconds
        next_poll = time.monotonic() + interval
        wd = self.notifier.watchdog_interval
        next_ping = time.monotonic() + (wd or 0)
        if wd:
            self.notifier.watchdog()

        def beat(polled: bool = False) -> None:
            # Only this loop pings: if a poll hangs, pings stop and systemd steps in. A ping
            # rides on a poll whenever the next one would fall due before the next poll.
            nonlocal next_ping
            now = time.monotonic()
            if wd and (now >= next_ping or (polled and next_ping < next_poll)):
                self.notifier.watchdog()
                next_ping = now + wd

        while not self._stop_requested:
            now = time.monotonic()
            due = next_poll if not wd else min(next_poll, next_ping)
            if due > now:
                self._wake.wait(due - now)
                self._wake.clear()
            if self._stop_requested:
                break
            if self._reload_requested:
                self._reload()
                beat()  # a reload is the loop advancing too; the poll below may follow
                interval = self.config.daemon.interval_seconds
                # A shorter interval applies now, not after the old one has run out.
                next_poll = min(next_poll, self._last_poll_end + interval)
            due = time.monotonic() >= next_poll
            polled = due or self._probe_landed
            if polled:
                self._probe_landed = False
                snap = self.poll_once()
                line = summarize(snap)
                if line != self._last_status:
                    self._last_status = line
                    self.notifier.status(line)
                if due:  # an extra poll for a landed probe keeps the regular cadence
                    next_poll = max(next_poll + interval, time.monotonic() if interval else 0.0)
                name_threads(self._named)  # threads started by the poll (probes, reapers)
            beat(polled)

    def shutdown(self, budget: float = 1.8) -> None:
        """Stop everything within ``budget`` seconds (systemd is told to expect ~2 s): HTTP,
        probes (their process groups killed), the Xid thread, alert senders, NVML."""
        deadline = time.monotonic() + budget

        def left(share: float) -> float:
            return max(0.05, min(share, deadline - time.monotonic()))

        self.notifier.stopping()
        if self._http is not None:
            self._http.stop(left(0.4))
        self._discovery.stop(left(0.1))
        self._tf.close(left(0.6))
        self._xids.stop(left(0.4))
        self._alerts.stop(left(0.2))
        self._nvml.close(left(0.2))
        self._state.close()
        self.notifier.close()

    def run(self) -> int:
        """startup → main_loop → shutdown. Returns 0 on a requested stop."""
        self.install_signal_handlers()
        become_subreaper()  # a probe's descendants come back here, to be killed, not to init
        raise_open_files_limit()  # room for MAX_CONNECTIONS clients
        try:
            self.startup()
        except StartupError:
            self.shutdown()
            raise
        try:
            self.main_loop()
        finally:
            self.shutdown()
        log.info("stopped after %d polls (pid %d)", self.polls, os.getpid())
        return 0
