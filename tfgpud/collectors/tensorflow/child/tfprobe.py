"""TensorFlow's view of the GPUs, reported from INSIDE one Python environment.

Run by path with the env's own interpreter (``/opt/venv/bin/python tfprobe.py [--smoke]``);
its directory, then first on ``sys.path``, holds nothing the env could import by mistake.
Uses only the standard library and TensorFlow — the env need not have tfgpud installed — and
stays valid Python 3.8 so old envs can run it. Prints exactly one JSON object on stdout and
exits 0, also when TensorFlow cannot be imported (``import_error``), so the parent can tell
"import failed" from "crashed"; it leaves with ``os._exit`` once the report is written, so a
crash in TF's or CUDA's shutdown code cannot spoil it. It never initialises a device (no
logical devices, no memory) unless ``--smoke`` is given, and then makes only the first GPU
visible and sets memory growth first.
"""

from __future__ import annotations

import ctypes
import glob
import importlib
import json
import os
import platform
import site
import stat
import sys
import traceback
from typing import Any

SCHEMA = 1
ENV_VARS = (
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "LD_LIBRARY_PATH",
    "TF_FORCE_GPU_ALLOW_GROWTH",
    "TF_CPP_MIN_LOG_LEVEL",
    "TF_GPU_ALLOCATOR",
    "CUDA_DEVICE_ORDER",
)
# Soname versions TF's loader asks for, by CUDA major (kept in step with tfgpud.diagnosis.compat).
_CUDA_SONAMES = {
    11: ("11.0", "11", "11", "10", "11", "11"),
    12: ("12", "12", "12", "11", "11", "12"),
    13: ("13", "13", "13", "12", "12", "12"),
}
_CUDA_LIBS = ("cudart", "cublas", "cublasLt", "cufft", "cusolver", "cusparse")
_RTLD_DI_LINKMAP = 2


def _major(text: Any) -> int | None:
    try:
        return int(str(text).split(".")[0])
    except ValueError:
        return None


def sonames(build: dict[str, Any]) -> list[tuple[str, str]]:
    """(short name, soname) of every CUDA library this TF build dlopens, then libcuda."""
    out: list[tuple[str, str]] = []
    cuda = _major(build.get("cuda_version")) if build.get("cuda_version") else None
    if cuda is not None:
        versions = _CUDA_SONAMES.get(cuda, (str(cuda),) * 6)
        out.extend((lib, f"lib{lib}.so.{ver}") for lib, ver in zip(_CUDA_LIBS, versions))  # noqa: B905 - Python 3.8
    cudnn = _major(build.get("cudnn_version")) if build.get("cudnn_version") else None
    if cudnn is not None:
        out.append(("cudnn", f"libcudnn.so.{cudnn}"))
    out.append(("cuda", "libcuda.so.1"))
    return out


def pip_library_dirs(paths: list[str]) -> list[str]:
    """The ``nvidia/<pkg>/lib`` dirs under each path entry: where TF's RUNPATH looks."""
    dirs: list[str] = []
    for entry in paths:
        if entry and os.path.isdir(entry):
            dirs.extend(sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib"))))
    return dirs


class _LinkMap(ctypes.Structure):
    _fields_ = [("l_addr", ctypes.c_void_p), ("l_name", ctypes.c_char_p)]


def _loaded_path(lib: ctypes.CDLL) -> str | None:
    """The file the dynamic loader actually mapped for ``lib`` (symlinks resolved)."""
    try:
        dlinfo = ctypes.CDLL(None).dlinfo
    except AttributeError:  # glibc < 2.34 keeps dlinfo in libdl
        try:
            dlinfo = ctypes.CDLL("libdl.so.2").dlinfo
        except (OSError, AttributeError):
            return None
    lmap = ctypes.POINTER(_LinkMap)()
    if dlinfo(ctypes.c_void_p(lib._handle), _RTLD_DI_LINKMAP, ctypes.byref(lmap)) != 0:
        return None
    name = lmap.contents.l_name
    return os.path.realpath(name.decode(errors="replace")) if name else None


def check_library(name: str, soname: str, pip_dirs: list[str]) -> dict[str, Any]:
    """dlopen ``soname`` the way TF would find it: pip's nvidia dirs, then the loader's search.

    Returns {"name", "soname", "loaded", "path", "error"} and never raises.
    """
    errors: list[str] = []
    candidates = [os.path.join(d, soname) for d in pip_dirs]
    candidates = [c for c in candidates if os.path.exists(c)] + [soname]
    for candidate in candidates:
        try:
            lib = ctypes.CDLL(candidate)
        except OSError as exc:
            errors.append(str(exc))
            continue
        return {
            "name": name,
            "soname": soname,
            "loaded": True,
            "path": _loaded_path(lib) or candidate,
            "error": None,
        }
    return {"name": name, "soname": soname, "loaded": False, "path": None, "error": errors[-1]}


def packages() -> tuple[dict[str, str], list[str]]:
    """Installed ``nvidia-*`` and ``tensorflow*`` distributions -> version, and the metadata dirs
    (plus the site dirs holding them, whose mtime changes when a package is added or removed)."""
    try:
        from importlib import metadata
    except ImportError:  # Python < 3.8
        return {}, []
    found: dict[str, str] = {}
    dirs: list[str] = []
    try:
        for dist in metadata.distributions():
            try:
                name = (dist.metadata["Name"] or "").lower()
                if not (name.startswith("nvidia-") or name.startswith("tensorflow")):
                    continue
                found[name] = dist.version
                path = getattr(dist, "_path", None)  # PathDistribution's metadata dir
            except Exception:  # noqa: BLE001 - one broken dist-info must not hide the rest
                continue
            if path is not None:
                for d in (str(path), os.path.dirname(str(path))):
                    if d not in dirs:
                        dirs.append(d)
    except Exception:  # noqa: BLE001 - a broken path entry: report what was found
        pass
    return found, dirs


def site_dirs() -> list[str]:
    """The interpreter's site-packages dirs (and the user site when enabled): their mtimes
    change when a package is installed, also into an env that has no TensorFlow yet."""
    dirs: list[str] = []
    getsite = getattr(site, "getsitepackages", None)  # an old virtualenv's site.py lacks it
    if getsite is not None:
        dirs.extend(getsite())
    if getattr(site, "ENABLE_USER_SITE", False):
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if os.path.isdir(d)]


def device_access() -> dict[str, str]:
    """For each /dev/nvidia* node: "ok", or why this user cannot open it read-write."""
    out: dict[str, str] = {}
    for node in sorted(glob.glob("/dev/nvidia*")):
        try:
            st = os.stat(node)
        except OSError as exc:
            out[node] = f"stat failed: {exc.strerror}"
            continue
        if not stat.S_ISCHR(st.st_mode):
            continue
        if os.access(node, os.R_OK | os.W_OK):
            out[node] = "ok"
        else:
            groups = ",".join(str(g) for g in os.getgroups())
            out[node] = (
                f"no read-write access (mode {stat.S_IMODE(st.st_mode):o}, uid {st.st_uid}, "
                f"gid {st.st_gid}; probe uid {os.getuid()}, groups {groups})"
            )
    return out


def _stringify(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _smoke(tf: Any, gpus: list[Any]) -> tuple[bool, str | None]:
    try:
        # Only the first GPU gets a context: the others stay untouched by the smoke test.
        tf.config.set_visible_devices(gpus[0], "GPU")
        tf.config.experimental.set_memory_growth(gpus[0], True)
        with tf.device("/GPU:0"):
            x = tf.constant([[1.0, 2.0], [3.0, 4.0]])
            y = tf.linalg.matmul(x, x)
        if [list(r) for r in y.numpy().tolist()] != [[7.0, 10.0], [15.0, 22.0]]:
            return False, f"matmul on GPU:0 gave a wrong result: {y.numpy().tolist()!r}"
        if "GPU" not in y.device:
            return False, f"matmul ran on {y.device}, not on GPU:0"
        return True, None
    except Exception as exc:  # noqa: BLE001 - any failure of the smoke test is its result
        return False, f"{type(exc).__name__}: {exc}"


def probe(smoke: bool) -> dict[str, Any]:
    """Gather the report. Only an interpreter-level crash can stop it from returning."""
    pkgs, pkg_dirs = packages()
    try:
        for d in site_dirs():
            if d not in pkg_dirs:
                pkg_dirs.append(d)
    except Exception:  # noqa: BLE001 - the fingerprint is a nicety: never lose the report
        pass
    out: dict[str, Any] = {
        "schema": SCHEMA,
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "environment": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        "packages": pkgs,
        "package_dirs": pkg_dirs,
        "device_access": device_access(),
    }
    try:
        tf: Any = importlib.import_module("tensorflow")
    except BaseException as exc:  # anything raised by an import is the answer
        if isinstance(exc, KeyboardInterrupt):
            raise
        out["import_error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc().splitlines()[-15:]
        pip_dirs = pip_library_dirs(sys.path)
        out["library_search_dirs"] = pip_dirs
        out["libraries"] = [check_library("cuda", "libcuda.so.1", pip_dirs)]
        return out
    out["tf_version"] = getattr(tf, "__version__", None)
    try:
        build = dict(tf.sysconfig.get_build_info())
    except Exception as exc:  # noqa: BLE001 - report, never die: the parent needs the rest
        build = {}
        out["build_info_error"] = f"{type(exc).__name__}: {exc}"
    out["build_info"] = {str(k): _stringify(v) for k, v in build.items()}
    try:
        gpus = list(tf.config.list_physical_devices("GPU"))
    except Exception as exc:  # noqa: BLE001 - report, never die: the parent needs the rest
        gpus = []
        out["gpus_error"] = f"{type(exc).__name__}: {exc}"
    devices = []
    for gpu in gpus:
        entry: dict[str, Any] = {"name": gpu.name}
        try:
            details = tf.config.experimental.get_device_details(gpu)
            entry["device_name"] = details.get("device_name")
            cc = details.get("compute_capability")
            entry["compute_capability"] = list(cc) if cc else None
        except Exception as exc:  # noqa: BLE001 - one odd device must not hide the others
            entry["details_error"] = f"{type(exc).__name__}: {exc}"
        devices.append(entry)
    out["gpus"] = devices
    # Checked after TF listed its devices: loading a library by full path first would let TF's
    # own soname lookup succeed and hide the very problem being diagnosed.
    pip_dirs = pip_library_dirs(sys.path)
    out["library_search_dirs"] = pip_dirs
    out["libraries"] = [check_library(n, s, pip_dirs) for n, s in sonames(build)]
    if smoke and gpus:
        ok, error = _smoke(tf, gpus)
        out["smoke"] = {"ok": ok, "error": error}
    return out


def main(argv: list[str]) -> int:
    # TF may print to stdout; keep stdout for the one JSON line by pointing fd 1 at stderr.
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    report = probe("--smoke" in argv)
    sys.stdout.flush()
    with os.fdopen(real_stdout, "w", encoding="utf-8") as stdout:
        stdout.write(json.dumps(report, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    # The report is out: leave without interpreter shutdown, where TF/CUDA atexit handlers
    # and destructors may crash and turn a valid report into a "crash".
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
