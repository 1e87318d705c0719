"""CUDA / driver / TensorFlow compatibility facts (sources in docs/diagnosis-facts.md), as data.

Pure lookups; nothing here touches the machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Minimum Linux driver of each CUDA toolkit release (the toolkit's GA driver).
TOOLKIT_DRIVERS: dict[tuple[int, int], str] = {
    (11, 2): "460.27.03",
    (11, 8): "520.61.05",
    (12, 0): "525.60.13",
    (12, 1): "530.30.02",
    (12, 2): "535.54.03",
    (12, 3): "545.23.06",
    (12, 4): "550.54.14",
    (12, 5): "555.42.02",
    (12, 6): "560.28.03",
    (12, 8): "570.26",
    (12, 9): "575.51.03",
    (13, 0): "580.65.06",
    (13, 1): "590.44.01",
    (13, 2): "595.45.04",
}

# Minor-version compatibility: any CUDA <major>.x application runs on at least this driver.
MINOR_COMPAT_DRIVERS: dict[int, str] = {11: "450.80.02", 12: "525.60.13", 13: "580"}


@dataclass(frozen=True)
class TestedBuild:
    """One row of tensorflow.org's "tested build configurations" (Linux GPU)."""

    tf: str  # "2.21"
    python: str  # "3.10-3.13"
    cudnn: str  # "9.3"
    cuda: str  # "12.5"


TESTED_BUILDS: tuple[TestedBuild, ...] = (
    TestedBuild("2.21", "3.10-3.13", "9.3", "12.5"),
    TestedBuild("2.20", "3.9-3.13", "9.3", "12.5"),
    TestedBuild("2.19", "3.9-3.12", "9.3", "12.5"),
    TestedBuild("2.18", "3.9-3.12", "9.3", "12.5"),
    TestedBuild("2.17", "3.9-3.12", "8.9", "12.3"),
    TestedBuild("2.16", "3.9-3.12", "8.9", "12.3"),
    TestedBuild("2.15", "3.9-3.11", "8.9", "12.2"),
    TestedBuild("2.14", "3.9-3.11", "8.7", "11.8"),
    TestedBuild("2.13", "3.8-3.11", "8.6", "11.8"),
    TestedBuild("2.12", "3.8-3.11", "8.6", "11.8"),
    TestedBuild("2.11", "3.7-3.10", "8.1", "11.2"),
    TestedBuild("2.10", "3.7-3.10", "8.1", "11.2"),
)

# The version `pip install` fixes point at when nothing better is known.
LATEST_TF = "2.21.0"


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """Leading dotted integers of ``text`` ("12.5.1" -> (12, 5, 1)); None if there are none."""
    if not text:
        return None
    m = re.match(r"\s*(\d+(?:\.\d+)*)", text)
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def cuda_major_minor(text: str | None) -> tuple[int, int] | None:
    """ "12.5.1" -> (12, 5); "12" -> (12, 0); None when unparsable."""
    v = parse_version(text)
    if not v:
        return None
    return (v[0], v[1] if len(v) > 1 else 0)


def driver_cuda(cuda_driver_version: int) -> tuple[int, int]:
    """NVML's ``nvmlSystemGetCudaDriverVersion`` (12040) -> (12, 4)."""
    return (cuda_driver_version // 1000, (cuda_driver_version % 1000) // 10)


def min_driver_for(cuda: tuple[int, int]) -> str | None:
    """The GA driver of the first toolkit release >= ``cuda`` that the table knows, if any."""
    candidates = sorted(k for k in TOOLKIT_DRIVERS if k >= cuda)
    return TOOLKIT_DRIVERS[candidates[0]] if candidates else None


def tested_build(tf_version: str | None) -> TestedBuild | None:
    """The tested configuration for TF ``major.minor`` of ``tf_version``, if listed."""
    v = parse_version(tf_version)
    if not v or len(v) < 2:
        return None
    key = f"{v[0]}.{v[1]}"
    return next((b for b in TESTED_BUILDS if b.tf == key), None)


def compute_targets(build_caps: str | None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Split build info ``cuda_compute_capabilities`` into (binary sm_ targets, PTX compute_).

    Accepts the comma-joined form the probe stores ("sm_60,sm_70,compute_90") or a list repr.
    """
    sm: list[tuple[int, int]] = []
    ptx: list[tuple[int, int]] = []
    for kind, digits in re.findall(r"(sm|compute)_(\d+)", build_caps or ""):
        cc = (int(digits[:-1]), int(digits[-1]))
        (sm if kind == "sm" else ptx).append(cc)
    return sorted(sm), sorted(ptx)


def cuda_library_sonames(cuda_version: str | None, cudnn_version: str | None) -> dict[str, str]:
    """The sonames TF dlopens for a build with this CUDA/cuDNN (from the wheel's loader)."""
    cuda = cuda_major_minor(cuda_version)
    names: dict[str, str] = {}
    if cuda is not None:
        major = cuda[0]
        table = {
            11: ("11.0", "11", "11", "10", "11", "11"),
            12: ("12", "12", "12", "11", "11", "12"),
            13: ("13", "13", "13", "12", "12", "12"),
        }.get(major, (str(major),) * 6)
        for lib, ver in zip(
            ("cudart", "cublas", "cublasLt", "cufft", "cusolver", "cusparse"), table, strict=True
        ):
            names[lib] = f"lib{lib}.so.{ver}"
    cudnn = parse_version(cudnn_version)
    if cudnn:
        names["cudnn"] = f"libcudnn.so.{cudnn[0]}"
    return names


def supports_python(build: TestedBuild, python_version: str | None) -> bool:
    """Whether ``build`` was tested with the Python ``major.minor`` of ``python_version``.

    An unknown Python version is taken as supported (nothing better is known).
    """
    py = parse_version(python_version)
    if not py or len(py) < 2:
        return True
    low, _, high = build.python.partition("-")
    lo, hi = parse_version(low), parse_version(high or low)
    if not lo or not hi:
        return True
    return lo[:2] <= py[:2] <= hi[:2]


def newest_tf_for(
    python_version: str | None,
    *,
    cuda_major: int | None = None,
    max_cuda: tuple[int, int] | None = None,
) -> TestedBuild | None:
    """The newest tested TF release that supports ``python_version`` and, when given, was
    built with CUDA ``cuda_major``.x and with a CUDA no newer than ``max_cuda``."""
    for b in TESTED_BUILDS:  # newest first
        cuda = cuda_major_minor(b.cuda)
        if cuda is None or not supports_python(b, python_version):
            continue
        if cuda_major is not None and cuda[0] != cuda_major:
            continue
        if max_cuda is not None and cuda > max_cuda:
            continue
        return b
    return None


def python_range(python_version: str | None) -> str:
    """ "3.12.3" -> "3.12"; "?" when unknown."""
    py = parse_version(python_version)
    return f"{py[0]}.{py[1]}" if py and len(py) > 1 else "?"


# --- compute capability (what a GPU can run of a build) ---------------------------------------

# TF 2.21 drops GPUs below this at listing ("Ignoring visible gpu device ... The minimum
# required Cuda capability is 3.5"), although its kernels start at 6.0.
TF_LISTING_MIN_CC = (3, 5)
# Blackwell and later: TF's compute_90 PTX does not run there (CUDA_ERROR_INVALID_PTX).
BLACKWELL_CC = (10, 0)
# Kernel targets of pip releases, as get_build_info()["cuda_compute_capabilities"] lists them.
KERNEL_TARGETS: dict[str, str] = {
    "2.21": "sm_60,sm_70,sm_80,sm_89,compute_90",
    "2.14": "sm_35,sm_50,sm_60,sm_70,sm_75,compute_80",
}
# The newest pip release with binary kernels for 3.5-5.x GPUs (CUDA 11.8; CUDA 12 has no
# Kepler), and the last driver branch that supports Kepler (3.x) GPUs.
OLD_GPU_TF = "2.14"
KEPLER_LAST_DRIVER_BRANCH = "470"
# The toolkit that first compiles for Blackwell (sm_100, sm_120).
BLACKWELL_CUDA = (12, 8)


def runs_on(cc: tuple[int, int], sm: list[tuple[int, int]], ptx: list[tuple[int, int]]) -> str:
    """ "binary", "ptx" (JIT-compiled from PTX) or "none" for a GPU of compute capability ``cc``.

    A binary ``sm_XY`` runs on GPUs of the same major and minor >= Y; PTX ``compute_XY`` on
    GPUs of compute capability >= X.Y, except that PTX older than Blackwell does not run on a
    Blackwell GPU (TF 2.21's compute_90 fails there with CUDA_ERROR_INVALID_PTX).
    """
    if any(m[0] == cc[0] and m[1] <= cc[1] for m in sm):
        return "binary"
    if any(p <= cc and (cc < BLACKWELL_CC or p >= BLACKWELL_CC) for p in ptx):
        return "ptx"
    return "none"


def cudnn_version_tuple(version: int) -> tuple[int, int, int]:
    """``cudnnGetVersion()`` -> (major, minor, patch): 90300 -> (9, 3, 0) (cuDNN 9 and later:
    major*10000 + minor*100 + patch), 8907 -> (8, 9, 7) (cuDNN 8: major*1000 + ...)."""
    if version >= 10000:
        return (version // 10000, version % 10000 // 100, version % 100)
    return (version // 1000, version % 1000 // 100, version % 100)


# The cuDNN a release was compiled with, in full, where known (TF's own line at device creation:
# "TensorFlow compiled with CUDA 12.5 and cuDNN 9.3.0"; its .bazelrc HERMETIC_CUDNN_VERSION).
COMPILED_CUDNN: dict[str, str] = {"2.21": "9.3.0"}


# The pip wheel (nvidia-<name>-cu<CUDA major>) that ships each library TF dlopens.
CUDA_LIB_WHEELS: dict[str, str] = {
    "cudart": "nvidia-cuda-runtime",
    "cublas": "nvidia-cublas",
    "cublasLt": "nvidia-cublas",
    "cufft": "nvidia-cufft",
    "cusolver": "nvidia-cusolver",
    "cusparse": "nvidia-cusparse",
    "cudnn": "nvidia-cudnn",
}
