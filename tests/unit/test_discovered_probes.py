"""Discovered envs on the probe schedule: the search thread, the schedule as envs come and go,
the plan of a discovered env's probe (decided from file modes, before anything runs), and
``tfgpud_tf_envs``."""

from __future__ import annotations

import os
import pwd
import threading
import time
from pathlib import Path

import pytest

from tfgpud.collectors.discovery import (
    DiscoveredEnv,
    DiscoveryResult,
    Distribution,
    EnvKind,
    EnvSource,
    ProbeTarget,
    SearchedPlace,
    merge_envs,
)
from tfgpud.collectors.tensorflow import TfProbeScheduler
from tfgpud.collectors.tensorflow.discovered import EnvDiscovery, probe_target
from tfgpud.config import DiscoverConfig, TfEnvConfig
from tfgpud.exporter import make_registry
from tfgpud.model import ProbeStatus, Snapshot, TfEnvRecord, TfProbeResult

ME = pwd.getpwuid(os.geteuid()).pw_name
CONFIGURED = TfEnvConfig(name="main", python="/opt/main/bin/python")


def found(prefix: str, label: str, *, uid: int | None = None, **kw: object) -> DiscoveredEnv:
    uid = os.geteuid() if uid is None else uid
    fields: dict[str, object] = {
        "env": label,
        "python": f"{prefix}/bin/python",
        "prefix": prefix,
        "kind": EnvKind.VENV,
        "source": f"{prefix}/pyvenv.cfg",
        "owner_uid": uid,
        "owner": pwd.getpwuid(uid).pw_name,
        "tensorflow": Distribution("tensorflow", "2.21.0"),
        "site_packages": f"{prefix}/lib/python3.11/site-packages",
        "python_version": "3.11.2",
        **kw,
    }
    return DiscoveredEnv(**fields)  # type: ignore[arg-type]


class Recorder:
    """A probe that answers at once and remembers how it was asked (name, run_as)."""

    def __init__(self, status: ProbeStatus = ProbeStatus.OK, delay: float = 0.0) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self.status = status
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(
        self, env: TfEnvConfig, *, timeout: float, cancel: threading.Event
    ) -> TfProbeResult:
        with self.lock:
            self.calls.append((env.name, env.run_as))
        cancel.wait(self.delay)
        return TfProbeResult(env.name, env.python, self.status, time.time(), self.delay)


def schedule(probe: Recorder, **kw: object) -> TfProbeScheduler:
    return TfProbeScheduler(
        [CONFIGURED],
        interval=21600,
        timeout=5,
        probe=probe,
        switch=True,
        **kw,  # type: ignore[arg-type]
    )


# --- the schedule as envs come and go -----------------------------------------------------------


def test_discovered_envs_join_and_leave_the_schedule_with_their_results() -> None:
    probe = Recorder()
    s = schedule(probe, max_concurrent=4)
    a, b = found("/srv/a", "srv-a"), found("/srv/b", "srv-b")
    s.set_discovered([a])
    assert [(r.env, r.source) for r in s.env_records()] == [
        ("main", "configured"),
        ("srv-a", "discovered"),
    ]
    assert s.maybe_start(None, 0.0) == ("main", "srv-a")
    assert s.wait_idle(2)
    s.set_discovered([a, b])  # rediscovery adds one: due at once, the others are not re-probed
    assert s.maybe_start(None, 1.0) == ("srv-b",)
    assert s.wait_idle(2)
    assert {r.env for r in s.results()} == {"main", "srv-a", "srv-b"}
    s.set_discovered([b])  # and drops one: its result goes, so its series and findings end
    assert {r.env for r in s.results()} == {"main", "srv-b"}
    assert [r.env for r in s.env_records()] == ["main", "srv-b"]
    s.set_discovered([a, b])  # found again: a new env, probed anew
    assert s.maybe_start(None, 2.0) == ("srv-a",)
    s.close()
    assert len(probe.calls) == 4


def test_a_configured_env_wins_over_its_discovered_duplicate() -> None:
    s = schedule(Recorder())
    s.set_discovered([found("/opt/main", "opt-main"), found("/opt/x", "main")])
    records = s.env_records()
    # Same interpreter as the configured one: dropped; a label taken by a configured name is
    # made unique with a hash of its path.
    assert [r.source for r in records] == ["configured", "discovered"]
    assert records[1].env.startswith("main-") and records[1].prefix == "/opt/x"
    s.close()


def test_an_env_whose_owner_changed_is_planned_and_probed_anew() -> None:
    probe = Recorder()
    s = schedule(probe, max_concurrent=4)
    s.set_discovered([found("/srv/a", "srv-a")])
    s.maybe_start(None, 0.0)
    assert s.wait_idle(2)
    s.set_discovered([found("/srv/a", "srv-a", tensorflow=Distribution("tensorflow", "2.22"))])
    assert s.maybe_start(None, 1.0) == ()  # metadata changed: the same env, its schedule kept
    assert "2.22" in s.env_records()[1].metadata[0]
    s.set_discovered([found("/srv/a", "srv-a", uid=65534)])
    assert s.maybe_start(None, 2.0) == ("srv-a",)
    s.close()


def test_a_dropped_envs_running_probe_finishes_unseen_and_still_counts() -> None:
    probe = Recorder(delay=0.5)
    s = TfProbeScheduler([], interval=21600, timeout=5, probe=probe, switch=True)
    s.set_discovered([found("/srv/a", "srv-a")])
    assert s.maybe_start(None, 0.0) == ("srv-a",)
    s.set_discovered([found("/srv/b", "srv-b")])
    assert s.maybe_start(None, 0.1) == ()  # the dropped env's probe still holds the one slot
    assert s.wait_idle(3)
    assert s.results() == ()  # its result landed nowhere
    assert s.maybe_start(None, 0.2) == ("srv-b",)
    s.close()


def test_not_run_is_retried_like_a_refusal() -> None:
    s = TfProbeScheduler([], interval=21600, timeout=5, probe=Recorder(), switch=False)
    s.set_discovered([found("/nonexistent/a", "a", uid=65534)])  # nobody's, cannot switch
    s.maybe_start(None, 0.0)
    assert s.wait_idle(2)
    (r,) = s.results()
    assert r.status is ProbeStatus.NOT_RUN and "CAP_SETUID" in (r.error or "")
    assert s.maybe_start(None, 899.0) == ()
    assert s.maybe_start(None, 900.0) == ("a",)
    s.close()


# --- the plan: decided from file modes, before anything of the env runs -------------------------


def venv(root: Path, name: str = "tf") -> Path:
    prefix = root / name
    (prefix / "bin").mkdir(parents=True)
    (prefix / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    (prefix / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.11.2\n")
    (prefix / "bin" / "python").write_text("#!/bin/sh\nexit 3\n")
    (prefix / "bin" / "python").chmod(0o755)
    return prefix


def target_of(env: DiscoveredEnv) -> ProbeTarget:
    (target,) = merge_envs([], [env])
    return target


def never(config: TfEnvConfig) -> TfProbeResult:
    raise AssertionError(f"{config.name} must not be executed")


def test_a_world_writable_env_is_not_run_and_says_who_can_write_it(tmp_path: Path) -> None:
    prefix = venv(tmp_path)
    (prefix / "lib" / "python3.11" / "site-packages").chmod(0o777)
    result = probe_target(target_of(found(str(prefix), "tf")), never, switch=True)
    assert result.status is ProbeStatus.NOT_RUN
    assert "everyone" in result.refused_writers and "writable by everyone" in (result.error or "")
    assert any("site-packages" in line for line in result.log_lines)


def test_a_kernelspecs_code_redirecting_variables_are_not_run(tmp_path: Path) -> None:
    prefix = venv(tmp_path)
    env = found(
        str(prefix),
        "tf",
        kind=EnvKind.JUPYTER_KERNEL,
        source=str(tmp_path / "kernel.json"),
        kernel_environment={"LD_PRELOAD": "/tmp/x.so"},
    )
    result = probe_target(target_of(env), never, switch=True)
    assert result.status is ProbeStatus.NOT_RUN and "LD_PRELOAD" in (result.error or "")


def test_kernelspec_variables_count_the_kernelspecs_writers(tmp_path: Path) -> None:
    prefix = venv(tmp_path)
    spec = tmp_path / "kernels" / "tf" / "kernel.json"
    spec.parent.mkdir(parents=True)
    spec.write_text("{}")
    spec.parent.chmod(0o777)
    env = found(
        str(prefix),
        "tf",
        kind=EnvKind.JUPYTER_KERNEL,
        source=str(spec),
        kernel_environment={"CUDA_VISIBLE_DEVICES": "0"},
    )
    result = probe_target(target_of(env), never, switch=True)
    assert result.status is ProbeStatus.NOT_RUN and "everyone" in result.refused_writers


def test_an_owned_env_is_probed_as_its_owner_root_owned_as_nobody(tmp_path: Path) -> None:
    prefix = venv(tmp_path)
    asked: list[str | None] = []

    def run(config: TfEnvConfig) -> TfProbeResult:
        asked.append(config.run_as)
        return TfProbeResult(config.name, config.python, ProbeStatus.OK, 0.0, 0.1)

    result = probe_target(target_of(found(str(prefix), "tf")), run, switch=True)
    assert result.status is ProbeStatus.OK
    assert asked == ["nobody" if os.geteuid() == 0 else ME]


def test_a_refusal_by_the_full_check_is_reported_as_not_run(tmp_path: Path) -> None:
    prefix = venv(tmp_path)

    def refused(config: TfEnvConfig) -> TfProbeResult:
        return TfProbeResult(
            config.name, config.python, ProbeStatus.REFUSED, 0.0, 0.1, error="sys.path: x"
        )

    result = probe_target(target_of(found(str(prefix), "tf")), refused, switch=True)
    assert result.status is ProbeStatus.NOT_RUN and result.error == "sys.path: x"


def test_a_configured_env_is_probed_as_configured() -> None:
    asked: list[TfEnvConfig] = []

    def run(config: TfEnvConfig) -> TfProbeResult:
        asked.append(config)
        return TfProbeResult(config.name, config.python, ProbeStatus.OK, 0.0, 0.1)

    probe_target(ProbeTarget(CONFIGURED, EnvSource.CONFIGURED), run, switch=True)
    assert asked == [CONFIGURED]


# --- the search on its own thread ---------------------------------------------------------------


def test_the_search_runs_on_its_thread_and_a_broken_one_keeps_the_envs(tmp_path: Path) -> None:
    env = found("/srv/a", "srv-a")
    answers: list[DiscoveryResult | Exception] = [
        DiscoveryResult(
            envs=(env,), found=1, searched=(SearchedPlace("/srv", "root", "searched"),)
        ),
        RuntimeError("bug"),
    ]

    def discover(settings: DiscoverConfig) -> DiscoveryResult:
        answer = answers.pop(0) if answers else DiscoveryResult(envs=(), found=0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    landed = threading.Event()
    d = EnvDiscovery(DiscoverConfig(interval_seconds=1), discover=discover, on_result=landed.set)
    assert d.latest().run is None and not d.latest().summary.done
    d.start()
    assert d.wait_first(5) and landed.wait(5)
    first = d.latest()
    assert first.envs == (env,) and first.summary.found == 1 and first.run is not None
    assert first.summary.searched[0] == "root /srv: searched"
    deadline = time.monotonic() + 5
    while d.latest().run is first.run and time.monotonic() < deadline:
        time.sleep(0.02)
    second = d.latest()
    assert second.run is not None and not second.run.success and "bug" in (second.run.error or "")
    assert second.envs == (env,)  # kept
    d.stop(2)


def test_discovery_off_searches_nothing() -> None:
    d = EnvDiscovery(DiscoverConfig(enabled=False), discover=never)  # type: ignore[arg-type]
    d.start()
    assert d.wait_first(0) and d.run_once().run is None
    assert d.latest().summary.enabled is False
    d.stop()


# --- tfgpud_tf_envs -----------------------------------------------------------------------------


def exposition(snap: Snapshot) -> str:
    from prometheus_client import generate_latest

    return generate_latest(make_registry(lambda: snap)).decode()


@pytest.mark.parametrize("sources", [(), ("configured", "discovered", "discovered")])
def test_tf_envs_by_source(sources: tuple[str, ...]) -> None:
    records = tuple(TfEnvRecord(f"e{i}", "/x/bin/python", s) for i, s in enumerate(sources))
    text = exposition(Snapshot(taken_at=0.0, tf_envs=records))
    assert f'tfgpud_tf_envs{{source="configured"}} {float(sources.count("configured"))}' in text
    assert f'tfgpud_tf_envs{{source="discovered"}} {float(sources.count("discovered"))}' in text
    assert "tfgpud_tf_envs" not in exposition(Snapshot(taken_at=0.0))
