"""The one table of finding codes. Everything that names a code derives from it.

Each :class:`Code` carries its default severity, its journal ``MESSAGE_ID`` (fixed forever:
``journalctl MESSAGE_ID=...`` filters on it), the ``docs/runbook.md`` section that tells an
operator what to do (an alert name where a Prometheus rule covers the code), a one-line meaning,
and the codes it may be a consequence of (``gpu-vanished`` while the driver is down names the
driver finding, so one root cause pages once: :mod:`tfgpud.diagnosis.causes` decides, per
snapshot, which present finding explains which). Tests check that every code emitted by
:mod:`tfgpud.diagnosis` is here and that each has all of these.

Alert labels derive from here too: ``alert_name(code)`` is the alert the daemon pushes for a
code, and :func:`cause_labels` gives every alert (pushed, or from a Prometheus rule through
``tfgpud_finding``) ``cause`` (the root cause's alert name; its own for a root cause) and
``role`` (``cause`` or ``consequence``), which Alertmanager's ``inhibit_rules`` match on.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from tfgpud.model import Severity

CRIT, WARN, INFO = Severity.CRITICAL, Severity.WARNING, Severity.INFO


@dataclass(frozen=True)
class Code:
    """One finding code and what is known about it before any finding exists."""

    code: str
    severity: Severity  # the usual severity; a rule may choose another for a special case
    message_id: str  # 32 hex digits; never change one
    runbook: str  # the heading of its section in docs/runbook.md
    meaning: str
    consequence_of: tuple[str, ...] = ()  # codes that, when present, explain this one


_DRIVER = (
    "nvml-library-missing",
    "driver-not-loaded",
    "driver-library-mismatch",
    "nouveau-bound",
    "device-nodes-missing",
    "nvml-no-permission",
    "nvml-unusable",
)
# Why TensorFlow in an env sees fewer GPUs than exist: the causes a fallback finding names.
TF_CAUSES = (
    "tf-cpu-only-build",
    "tf-gpus-hidden-by-env",
    "tf-cuda-libs-missing",
    "tf-libcuda-missing",
    "tf-driver-too-old",
    "tf-driver-dso-mismatch",
    "tf-compute-capability-unsupported",
    "tf-cudnn-mismatch",
    "tf-device-permission",
)
_DRIVER_DOWN = "TfgpudNvidiaDriverUnavailable"
_FALLBACK = "TfgpudTensorflowCpuFallback"
# A driver that does not answer explains every GPU and env that sees nothing.
_NO_GPU_VISIBLE = (*TF_CAUSES, *_DRIVER)

_TABLE = (
    # --- host: PCI bus, driver, NVML ----------------------------------------------------------
    Code("no-nvidia-gpu", INFO, "80288b3bce544d1a981941066cecc641", "no-nvidia-gpu",
         "No NVIDIA GPU on the bus, in NVML, in the baseline or in [expect]: CPU-only is right."),
    Code("nvml-library-missing", CRIT, "df7f81cb46ca40dd88af34f4e79e2740", _DRIVER_DOWN,
         "libnvidia-ml.so.1 is not installed although GPUs exist."),
    Code("driver-not-loaded", CRIT, "ed2145d361e6434db4ec0bdce383c0ca", _DRIVER_DOWN,
         "The nvidia kernel module is not loaded.",
         consequence_of=("nouveau-bound",)),
    Code("driver-library-mismatch", CRIT, "0b5baa979b534ca793e523a1c1f4159f", _DRIVER_DOWN,
         "The user-space driver library and the kernel module differ in version."),
    Code("nouveau-bound", CRIT, "cff761cec351444189d4e25902b935e9", _DRIVER_DOWN,
         "The open-source nouveau driver owns the GPUs."),
    Code("device-nodes-missing", CRIT, "413ee3833984409da7644856e12f6460", _DRIVER_DOWN,
         "The module is loaded but /dev/nvidiactl or /dev/nvidiaN are missing."),
    Code("nvml-no-permission", CRIT, "dd0b2f0049d943e996a3d08a2a590501", _DRIVER_DOWN,
         "NVML refuses access to the driver or to one GPU (device node permissions)."),
    Code("nvml-unusable", CRIT, "1152ccadca4648bb82075166b6203392", _DRIVER_DOWN,
         "NVML fails for the whole driver with an error no other driver finding names "
         "(UNKNOWN, the GPU count failed, CORRUPTED_INFOROM, ...).",
         consequence_of=("driver-library-mismatch", "nouveau-bound", "device-nodes-missing")),
    # --- GPUs --------------------------------------------------------------------------------
    Code("gpu-lost", CRIT, "907c1ae275214d1188582433cbf12be2", "TfgpudGpuLost",
         "NVML reports a GPU as lost (fallen off the bus)."),
    Code("gpu-vanished", CRIT, "90005464d5674e6cbf52456ae5edfed9", "TfgpudGpuVanished",
         "A GPU in the baseline (or counted by [expect]) is not visible now.",
         consequence_of=_DRIVER),
    Code("gpu-appeared", INFO, "69401bf13da84521a762a180e2b39b02", "gpu-appeared",
         "A GPU joined the baseline recently."),
    Code("gpu-xid-critical", CRIT, "09f63ede971f4c0292eef03ef81c9295", "TfgpudGpuXidCritical",
         "The driver logged an Xid error that needs a person in the last hour.",
         consequence_of=("gpu-lost",)),
    Code("baseline-state-error", WARN, "e3f4cd57e3714186bbd8032a376318e6",
         "baseline-state-error", "The baseline file could not be read or written."),
    # --- memory and workloads ----------------------------------------------------------------
    Code("gpu-memory-pressure", WARN, "3b8bebca432a405a91d64d8d9299d2bf",
         "TfgpudGpuMemoryPressure",
         "Processes sharing a GPU fill its memory, or one could not get memory.",
         consequence_of=("gpu-memory-held-idle",)),
    Code("gpu-memory-held-idle", WARN, "4c9d0a7e5b1f4e2a9c3d6b8e0f2a4c61",
         "TfgpudGpuMemoryHeldIdle", "A process holds most of an idle GPU's memory."),
    Code("tf-job-on-cpu", WARN, "5507116cfe344c5ab63e73c5c163b1ea", "TfgpudTensorflowJobOnCpu",
         "A running TensorFlow job computes on the CPU while GPUs are usable.",
         consequence_of=("tf-cpu-fallback", "tf-partial-visibility", *TF_CAUSES)),
    # --- TensorFlow, per env -----------------------------------------------------------------
    Code("tf-cpu-fallback", CRIT, "ea93791d3fb0411384dfb0928b6a1f6a", _FALLBACK,
         "GPUs exist but TensorFlow in the env sees none.",
         consequence_of=_NO_GPU_VISIBLE),
    Code("tf-partial-visibility", CRIT, "d02e34c10307444097827f2a79091354", _FALLBACK,
         "TensorFlow in the env sees some but not all of the GPUs NVML reports.",
         consequence_of=_NO_GPU_VISIBLE),
    Code("tf-cpu-only-build", CRIT, "65e4d0c797574608bd68d548443c06bb", _FALLBACK,
         "The env's TensorFlow is a CPU-only build."),
    Code("tf-gpus-hidden-by-env", CRIT, "e66ceeea30944b85a564c0e9cf11964a", _FALLBACK,
         "CUDA_VISIBLE_DEVICES hides every GPU from the env."),
    Code("tf-cuda-libs-missing", CRIT, "5b76505c76fb48b5a2453bd3bd369b26", _FALLBACK,
         "CUDA user-space libraries the build needs cannot be loaded."),
    Code("tf-libcuda-missing", CRIT, "9679f57d230b41dbb510aa91d2303a9b", _FALLBACK,
         "The driver's libcuda.so.1 cannot be loaded in the env.",
         consequence_of=("nvml-library-missing",)),
    Code("tf-driver-too-old", CRIT, "8de6b7d8440f4408b86e0aba005367b8", _FALLBACK,
         "The driver supports an older CUDA than the build needs (or its PTX needs)."),
    Code("tf-driver-dso-mismatch", CRIT, "5c0ebc3fc1e6478d84d8b235091da9be", _FALLBACK,
         "The env's libcuda does not match the loaded kernel module."),
    Code("tf-compute-capability-unsupported", CRIT, "0c2869bdb6d645a5bd83a0d34897eece",
         _FALLBACK, "The build has no kernels (binary or PTX) for a GPU's compute capability."),
    Code("tf-cudnn-mismatch", CRIT, "773bbcc00a4c4edbb20f476d205497c8", _FALLBACK,
         "The installed cuDNN does not match the one the build needs."),
    Code("tf-device-permission", CRIT, "a1d087d65a144613a4ba7be644fcea71", _FALLBACK,
         "The probe's user cannot open the /dev/nvidia* nodes."),
    Code("tf-ptx-jit-only", WARN, "98dcd8ab2e4c4159bea38b7669f5af27", "tf-ptx-jit-only",
         "A GPU runs the build only through PTX JIT compilation (slow first start)."),
    Code("tf-gpus-selected-by-env", INFO, "26d1654a5de24faca697954e65f42532",
         "tf-gpus-selected-by-env",
         "CUDA_VISIBLE_DEVICES gives the env some of the GPUs, and TensorFlow sees those."),
    Code("tf-smoke-failed", CRIT, "76769cffefaa42a18683dffc7c537c8b", "TfgpudCriticalFinding",
         "TensorFlow lists the GPU but a small matmul on it fails.",
         consequence_of=(
             "gpu-memory-pressure", "tf-driver-too-old", "tf-compute-capability-unsupported",
         )),
    Code("tf-import-failed", CRIT, "8f2ac00d35114e19b80897d0de48563a",
         "TfgpudTensorflowProbeFailing", "TensorFlow cannot be imported, or its python is gone."),
    Code("tf-import-crashed", CRIT, "a6855a0937514649a2a465e50bdff6a5",
         "TfgpudTensorflowProbeFailing", "The probe crashed, failed or printed no report."),
    Code("tf-probe-timeout", WARN, "ee4ce0205867431bac7d38d3aaa4e88e",
         "TfgpudTensorflowNotProbed", "The probe did not answer in time."),
    Code("tf-probe-refused", WARN, "b0c4f1d2e8a94c6f8a1e3d5b7c9f2a64",
         "TfgpudTensorflowNotProbed", "The env was not probed, for safety or access."),
    Code("tf-no-env", WARN, "1f6b3e8d2c7a4b95a0e4d9c2b7f1e356", "TfgpudTensorflowNotProbed",
         "The machine has GPUs but no TensorFlow env is configured or found to probe."),
)  # fmt: skip

CODES: dict[str, Code] = {c.code: c for c in _TABLE}

# journald MESSAGE_ID per finding code (`journalctl MESSAGE_ID=...`).
MESSAGE_IDS: dict[str, str] = {c.code: c.message_id for c in _TABLE}

_ID_NAMESPACE = uuid.UUID("1b4e28ba-2fa1-41d2-883f-0016d3cca427")


def message_id(code: str) -> str:
    """The journal MESSAGE_ID for ``code`` (32 hex digits); derived for a code not listed."""
    return MESSAGE_IDS.get(code) or uuid.uuid5(_ID_NAMESPACE, code).hex


def causes_of(code: str) -> frozenset[str]:
    """The codes ``code`` may be a consequence of (empty for a root cause or an unknown code)."""
    c = CODES.get(code)
    return frozenset(c.consequence_of) if c is not None else frozenset()


# Codes whose finding explains others only while NVML is down: a driver that still answers
# (a version mismatch NVML survives, one GPU refused) does not hide the GPUs it lists.
DRIVER_CODES = frozenset(_DRIVER)


def alert_name(code: str) -> str:
    """``gpu-vanished`` → ``TfgpudGpuVanished``, ``tf-cpu-fallback`` →
    ``TfgpudTensorflowCpuFallback``: the alert the daemon pushes for the code (the Prometheus
    rule of the same name, where one exists, covers it too)."""
    parts = code.split("-")
    if parts[0] == "tf":
        parts[0] = "tensorflow"
    return "Tfgpud" + "".join(p[:1].upper() + p[1:] for p in parts)


def cause_labels(code: str, cause: str | None) -> dict[str, str]:
    """The ``cause`` and ``role`` labels of a finding's alert: a consequence names its root
    cause's alert; a root cause names its own, so ``equal: [host, cause]`` pairs them."""
    return {
        "cause": alert_name(cause or code),
        "role": "consequence" if cause else "cause",
    }
