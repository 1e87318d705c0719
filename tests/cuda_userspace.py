"""The simulated CUDA user-space (tests/fakedriver, built into build/fakedriver/cuda-userspace/)
laid out the two ways a user's machine has it.

- `lay_out_libdir(dest)`: a plain directory of libraries, as a tarball or distro install
  leaves them, for LD_LIBRARY_PATH.
- `make_wheel_venv(dest)`: what `pip install tensorflow[and-cuda]` leaves: a venv whose
  site-packages holds `nvidia/<pkg>/lib/<soname>` and `nvidia_<pkg>_cu12-<version>.dist-info`,
  next to the real TensorFlow 2.21 of the repo's `.venv`.

Typical use::

    from cuda_userspace import cuda_env, lay_out_libdir

    libdir = lay_out_libdir(tmp_path / "cuda", omit={"cudnn"})
    env = cuda_env(scenario, lib_dirs=[libdir])   # + build/fakedriver for the driver

How the wheel venv shares TensorFlow, and why (measured with TF 2.21 on Debian 12's glibc):

- TensorFlow's loader searches `libtensorflow_framework.so.2`'s RUNPATH, entries of the form
  `$ORIGIN/../nvidia/<pkg>/lib`. `$ORIGIN` is the directory the dynamic linker loaded that file
  from, so the `nvidia/` tree must sit next to the `tensorflow/` package that is imported.
- A `.pth` file alone (site-packages of `.venv` added to the throwaway venv's path) imports
  TensorFlow from `.venv`: `$ORIGIN/../nvidia` is then `.venv`'s, and every CUDA library
  is missing. A symlink to `.venv`'s `tensorflow/` directory does not help either: the
  framework library is loaded as `tensorflow/python/platform/../../libtensorflow_framework.so.2`
  (the RUNPATH of the extension that needs it), so its `$ORIGIN` keeps those `..`, and `..`
  taken after a symlinked directory leads back into `.venv`.
- So the venv gets a hard-linked copy of the `tensorflow/` package directory (`cp -al`: about
  26,000 links, under a second, no data copied) and a `.pth` file that adds `.venv`'s
  site-packages (with its own `.pth` files, via `site.addsitedir`) for everything else: numpy,
  keras, TensorFlow's dist-info. Hard links need `dest` on the same filesystem as `.venv`.
  Never write into the copy: its files are `.venv`'s.

The cuSOLVER gap: the RUNPATH of TF 2.21's `libtensorflow_framework.so.2` lists
`nvidia/{nccl,cuda_cupti,cublas,cudnn,cufft,cusparse,cuda_runtime,nvshmem}/lib` but not
`nvidia/cusolver/lib` (only `libtensorflow_cc.so.2` has that one), and the dlopen of
`libcusolver.so.11` is made from the framework library. In this layout, without
LD_LIBRARY_PATH, TensorFlow opens the six other libraries, fails on `libcusolver.so.11` alone
("Could not load dynamic library 'libcusolver.so.11'" at TF_CPP_MAX_VLOG_LEVEL=1) and lists no
GPU; with `nvidia/cusolver/lib` on LD_LIBRARY_PATH it lists every simulated GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from helpers import FAKEDRIVER_DIR, REPO_ROOT, build_fakedriver, fakedriver_env

CUDA_USERSPACE_DIR = FAKEDRIVER_DIR / "cuda-userspace"
BASE_VENV = REPO_ROOT / ".venv"


@dataclass(frozen=True)
class CudaLib:
    name: str  # what `omit` takes
    soname: str
    package: str  # the nvidia/<package>/lib directory of the pip wheel


# The seven libraries TF 2.21 dlopens before it lists a GPU (all must load).
TF_CUDA_LIBS: tuple[CudaLib, ...] = (
    CudaLib("cudart", "libcudart.so.12", "cuda_runtime"),
    CudaLib("cublas", "libcublas.so.12", "cublas"),
    CudaLib("cublasLt", "libcublasLt.so.12", "cublas"),
    CudaLib("cufft", "libcufft.so.11", "cufft"),
    CudaLib("cusolver", "libcusolver.so.11", "cusolver"),
    CudaLib("cusparse", "libcusparse.so.12", "cusparse"),
    CudaLib("cudnn", "libcudnn.so.9", "cudnn"),
)
LIB_NAMES = frozenset(lib.name for lib in TF_CUDA_LIBS)
CUDNN8_SONAME = "libcudnn.so.8"

# nvidia/<package> -> (distribution, version): the lowest versions TF 2.21's `and-cuda` extra
# accepts, i.e. CUDA 12.5 and cuDNN 9.3.
WHEELS: dict[str, tuple[str, str]] = {
    "cublas": ("nvidia-cublas-cu12", "12.5.3.2"),
    "cuda_runtime": ("nvidia-cuda-runtime-cu12", "12.5.82"),
    "cudnn": ("nvidia-cudnn-cu12", "9.3.0.75"),
    "cufft": ("nvidia-cufft-cu12", "11.2.3.61"),
    "cusolver": ("nvidia-cusolver-cu12", "11.6.3.83"),
    "cusparse": ("nvidia-cusparse-cu12", "12.5.1.3"),
}
CUDNN8_WHEEL_VERSION = "8.9.7.29"  # the last nvidia-cudnn-cu12 of cuDNN 8


def build_cuda_userspace() -> Path:
    """Build the driver and the CUDA user-space stubs (idempotent); return their directory."""
    build_fakedriver(FAKEDRIVER_DIR)
    missing = [
        soname
        for soname in (*(lib.soname for lib in TF_CUDA_LIBS), CUDNN8_SONAME)
        if not (CUDA_USERSPACE_DIR / soname).is_file()
    ]
    if missing:
        raise RuntimeError(f"make fakedriver did not build {missing} in {CUDA_USERSPACE_DIR}")
    return CUDA_USERSPACE_DIR


def _chosen(omit: Iterable[str], cudnn: int) -> list[tuple[CudaLib, str]]:
    """(library, soname to ship) for every library that is not omitted."""
    omitted = set(omit)
    unknown = omitted - LIB_NAMES
    if unknown:
        raise ValueError(f"unknown libraries {sorted(unknown)}; known: {sorted(LIB_NAMES)}")
    if cudnn not in (8, 9):
        raise ValueError(f"cudnn must be 9 or 8, not {cudnn!r}")
    chosen = []
    for lib in TF_CUDA_LIBS:
        if lib.name in omitted:
            continue
        soname = CUDNN8_SONAME if lib.name == "cudnn" and cudnn == 8 else lib.soname
        chosen.append((lib, soname))
    return chosen


def lay_out_libdir(dest: Path, *, omit: Iterable[str] = (), cudnn: int = 9) -> Path:
    """Copy the stubs into `dest` (created) for LD_LIBRARY_PATH; return `dest`.

    `omit` names libraries to leave out (`CudaLib.name`: "cudart", "cublas", "cublasLt",
    "cufft", "cusolver", "cusparse", "cudnn"); `cudnn=8` ships `libcudnn.so.8` instead of
    `libcudnn.so.9` (which TF 2.21 treats as missing).
    """
    src = build_cuda_userspace()
    dest.mkdir(parents=True, exist_ok=True)
    for _lib, soname in _chosen(omit, cudnn):
        shutil.copy2(src / soname, dest / soname)
    return dest


@dataclass(frozen=True)
class WheelVenv:
    root: Path
    python: Path
    site_packages: Path

    def lib_dir(self, package: str) -> Path:
        """site-packages/nvidia/<package>/lib (it may not exist: see make_wheel_venv's omit)."""
        return self.site_packages / "nvidia" / package / "lib"


def _site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3.*/site-packages"))
    if len(found) != 1:
        raise RuntimeError(f"expected one site-packages in {venv}, found {found}")
    return found[0]


def _write_dist_info(site_packages: Path, package: str, version: str, files: list[str]) -> None:
    dist, _ = WHEELS[package]
    info = site_packages / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
        f"Summary: simulated {dist} (tfgpud tests)\nLicense: NVIDIA Proprietary Software\n"
    )
    (info / "INSTALLER").write_text("pip\n")
    (info / "top_level.txt").write_text("nvidia\n")
    record = [*files, f"{info.name}/METADATA", f"{info.name}/INSTALLER", f"{info.name}/RECORD"]
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in record))


def make_wheel_venv(
    dest: Path, *, omit: Iterable[str] = (), cudnn: int = 9, base_venv: Path = BASE_VENV
) -> WheelVenv:
    """A throwaway venv at `dest` laid out as `pip install tensorflow[and-cuda]` leaves it.

    The real TensorFlow of `base_venv` is shared (see the module docstring: hard-linked
    `tensorflow/` plus a `.pth` file). `omit` and `cudnn` as for lay_out_libdir; a package
    whose libraries are all omitted gets no dist-info either, `cudnn=8` installs
    nvidia-cudnn-cu12 8.9.7.29 with `libcudnn.so.8`.
    """
    src = build_cuda_userspace()
    chosen = _chosen(omit, cudnn)
    base_sp = _site_packages(base_venv)
    if not (base_sp / "tensorflow").is_dir():
        raise RuntimeError(f"no TensorFlow in {base_sp}: run `make venv` first")
    if dest.exists():
        raise FileExistsError(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if os.stat(dest.parent).st_dev != os.stat(base_sp).st_dev:
        raise ValueError(
            f"{dest} is on another filesystem than {base_sp}: the hard-linked TensorFlow "
            "needs both on one"
        )
    subprocess.run(  # from base_venv's Python: the same version as the TensorFlow it shares
        [str(base_venv / "bin" / "python"), "-m", "venv", "--without-pip", str(dest)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    sp = _site_packages(dest)
    subprocess.run(
        ["cp", "-al", str(base_sp / "tensorflow"), str(sp / "tensorflow")],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (sp / "_tfgpud_shared_site_packages.pth").write_text(
        f"import site; site.addsitedir({str(base_sp)!r})\n"
    )

    (sp / "nvidia").mkdir()
    (sp / "nvidia" / "__init__.py").write_text("")
    by_package: dict[str, list[str]] = {}
    for lib, soname in chosen:
        lib_dir = sp / "nvidia" / lib.package / "lib"
        lib_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / soname, lib_dir / soname)
        by_package.setdefault(lib.package, []).append(f"nvidia/{lib.package}/lib/{soname}")
    for package, files in by_package.items():
        (sp / "nvidia" / package / "__init__.py").write_text("")
        version = CUDNN8_WHEEL_VERSION if package == "cudnn" and cudnn == 8 else WHEELS[package][1]
        _write_dist_info(sp, package, version, [f"nvidia/{package}/__init__.py", *files])
    return WheelVenv(dest, dest / "bin" / "python", sp)


def cuda_env(
    scenario: Path | str | None,
    *,
    lib_dirs: Sequence[Path] = (),
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """helpers.fakedriver_env with `lib_dirs` ahead of the driver on LD_LIBRARY_PATH.

    The driver (build/fakedriver: libcuda.so.1, libnvidia-ml.so.1) stays on the path, as a
    system-installed driver stays in ld.so.cache; its cuda-userspace/ subdirectory is not.
    """
    env = fakedriver_env(scenario)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*map(str, lib_dirs), str(FAKEDRIVER_DIR)])
    env.update(extra or {})
    return env
