"""A discovered env holding REAL TensorFlow 2.21 is probed and diagnosed exactly as the same env
configured in ``[[tensorflow.envs]]``: the same findings and the same ``tfgpud_tf_*`` series,
but for the env's name.

The env is a venv made here (``venv --without-pip`` on the system Python) whose site-packages
hold a ``tensorflow-2.21.0.dist-info`` (what discovery reads) and a ``.pth`` to the checkout's
``.venv`` (what the probe imports). Both runs go through ``tfgpud doctor``'s snapshot with the
GPUs injected (this machine has none, so TensorFlow falls back to the CPU) and the real search
and probe. Two real TensorFlow imports, ~4 s each.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import REPO_ROOT

from tfgpud.config import Config, parse_config
from tfgpud.diagnosis import diagnose
from tfgpud.doctor import collect_snapshot
from tfgpud.exporter import make_registry
from tfgpud.model import GpuReading, NvmlReading, PciGpu, PciReading, Snapshot

pytestmark = pytest.mark.slow

SITE = REPO_ROOT / ".venv" / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
BASE = Path("/usr/bin/python3")
PCI = PciReading(
    gpus=tuple(PciGpu(f"0000:0{i}:00.0", "0x20b2", "0x030200", "nvidia") for i in (1, 2)),
    nvidia_module_version="550.54.14",
    device_nodes=("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"),
)
NVML = NvmlReading(
    up=True,
    driver_version="550.54.14",
    cuda_driver_version=12040,
    gpus=tuple(
        GpuReading(i, f"GPU-cccccccc-0000-4000-8000-00000000000{i}", "NVIDIA A100-SXM4-80GB",
                   compute_capability=(8, 0))
        for i in (0, 1)
    ),
)  # fmt: skip
# glog's "I0000 00:00:1796162417.029841   11859 " prefix: a time and a pid, different each run.
GLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:[\d.]+\s+\d+ ")
VOLATILE = ("_duration_seconds", "_timestamp_seconds")


def _base_matches() -> bool:
    if not BASE.exists():
        return False
    out = subprocess.run(
        [str(BASE), "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return out == str(tuple(sys.version_info[:2]))


@pytest.fixture(scope="module")
def tf_root() -> Iterator[Path]:
    """<root>/opt/tf: a venv on the system Python whose site-packages reach real TF 2.21."""
    if not _base_matches() or not (SITE / "site-packages" / "tensorflow").is_dir():
        pytest.skip("needs /usr/bin/python3 of the checkout's Python version and TF in .venv")
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="tfgpud-discovered-tf-"))
    root.chmod(0o755)  # the probe may run as nobody
    prefix = root / "opt" / "tf"
    subprocess.run([str(BASE), "-m", "venv", "--without-pip", str(prefix)], check=True)
    site = prefix / "lib" / SITE.name / "site-packages"
    meta = site / "tensorflow-2.21.0.dist-info"
    meta.mkdir()
    shutil.copy(SITE / "site-packages" / "tensorflow-2.21.0.dist-info" / "METADATA", meta)
    (site / "checkout-venv.pth").write_text(f"{SITE / 'site-packages'}\n")
    yield root
    shutil.rmtree(root)


def _snapshot(config: Config) -> Snapshot:
    snap = collect_snapshot(config, read_pci=lambda *_: PCI, read_nvml=lambda _: NVML)
    return replace(snap, findings=diagnose(snap, config))


def _findings(snap: Snapshot, env: str) -> set[tuple[str, ...]]:
    def norm(text: str) -> str:
        return GLOG.sub("", text).replace(env, "<env>")

    return {
        (f.code, f.severity.value, norm(f.subject), norm(f.summary), norm(f.fix),
         *sorted(norm(e) for e in f.evidence))
        for f in snap.findings
    }  # fmt: skip


def _series(snap: Snapshot, env: str) -> set[str]:
    from prometheus_client import generate_latest

    text = generate_latest(make_registry(lambda: snap)).decode()
    return {
        line.replace(f'"{env}"', '"<env>"')
        for line in text.splitlines()
        if line.startswith(("tfgpud_tf_", "tfgpud_finding"))
        and ("env=" in line or "subject=" in line)  # tfgpud_tf_envs counts by source
        and not any(v in line.split("{")[0] for v in VOLATILE)
    }


def test_a_discovered_real_tensorflow_env_is_diagnosed_like_a_configured_one(
    tf_root: Path, tmp_path: Path
) -> None:
    from tfgpud.collectors.discovery import base_label

    prefix = tf_root / "opt" / "tf"
    python = prefix / "bin" / "python"
    # Root's env is probed as nobody when discovered; configured, the same user is named.
    run_as = '\nrun_as = "nobody"' if os.geteuid() == 0 else ""
    # Hermetic: this machine's running TensorFlow jobs (the workloads collector) are not ours.
    state = f'[daemon]\nstate_dir = "{tmp_path}"\n[workloads]\nenabled = false\n'
    discovered = _snapshot(
        parse_config(
            state + f'[tensorflow.discover]\nroots = ["{tf_root / "opt"}"]\n'
            "jupyter = false\nconda = false\nsystem = false\n"
        )
    )
    configured = _snapshot(
        parse_config(
            state + "[tensorflow.discover]\nenabled = false\n"
            f'[[tensorflow.envs]]\nname = "configured"\npython = "{python}"{run_as}\n'
        )
    )
    label = base_label(str(prefix))
    assert [(e.env, e.source) for e in discovered.tf_envs or ()] == [(label, "discovered")]
    (r,) = discovered.tf
    assert r.ok and r.tf_version == "2.21.0" and r.gpus == (), r
    assert {f.code for f in discovered.findings} >= {"tf-cpu-fallback", "tf-libcuda-missing"}
    found = _findings(discovered, label)
    assert found == _findings(configured, "configured") and len(found) >= 2
    series = _series(discovered, label)
    assert 'tfgpud_tf_cpu_fallback{env="<env>"} 1.0' in series
    assert series == _series(configured, "configured")
