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
import re
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
    """The ``nvidia/<pkg>/lib`` dirs under each path entry: where pip's CUDA wheels put them."""
    dirs: list[str] = []
    for entry in paths:
        if entry and os.path.isdir(entry):
            dirs.extend(sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib"))))
    return dirs


class _LinkMap(ctypes.Structure):
    _fields_ = [("l_addr", ctypes.c_void_p), ("l_name", ctypes.c_char_p)]


class _SerInfoHead(ctypes.Structure):
    _fields_ = [("dls_size", ctypes.c_size_t), ("dls_cnt", ctypes.c_uint)]


class _SerPath(ctypes.Structure):
    _fields_ = [("dls_name", ctypes.c_char_p), ("dls_flags", ctypes.c_uint)]


_RTLD_NOLOAD = 4
_RTLD_DI_SERINFO, _RTLD_DI_SERINFOSIZE = 4, 5
# The loader's built-in directories (after LD_LIBRARY_PATH, RUNPATH and ld.so.cache).
_DEFAULT_DIR = re.compile(r"^/(usr/)?lib(32|64)?(/[^/]+-linux-gnu[^/]*)?/?$")


def _dlinfo() -> Any:
    try:
        return ctypes.CDLL(None).dlinfo
    except AttributeError:  # glibc < 2.34 keeps dlinfo in libdl
        try:
            return ctypes.CDLL("libdl.so.2").dlinfo
        except (OSError, AttributeError):
            return None


def _loaded_path(lib: ctypes.CDLL) -> str | None:
    """The file the dynamic loader actually mapped for ``lib`` (symlinks resolved)."""
    dlinfo = _dlinfo()
    if dlinfo is None:
        return None
    lmap = ctypes.POINTER(_LinkMap)()
    if dlinfo(ctypes.c_void_p(lib._handle), _RTLD_DI_LINKMAP, ctypes.byref(lmap)) != 0:
        return None
    name = lmap.contents.l_name
    return os.path.realpath(name.decode(errors="replace")) if name else None


def framework_library(tf: Any) -> str | None:
    """TensorFlow's ``libtensorflow_framework.so.*``, the library whose dlopen calls load the
    CUDA libraries (so its RUNPATH is the one searched), if this process has it loaded."""
    try:
        tf_dir = os.path.dirname(os.path.abspath(tf.__file__))
    except (AttributeError, TypeError):
        return None
    for path in sorted(glob.glob(os.path.join(tf_dir, "libtensorflow_framework.so*"))):
        try:
            ctypes.CDLL(path, mode=os.RTLD_NOW | _RTLD_NOLOAD)
        except OSError:
            continue
        return path
    return None


def search_path(library: str) -> list[str] | None:
    """The directories the dynamic loader searches for a dlopen made by ``library`` (already
    loaded), in order: LD_LIBRARY_PATH, its RUNPATH ($ORIGIN expanded), the default dirs; the
    ld.so cache is searched between the last two. None when the loader cannot tell."""
    dlinfo = _dlinfo()
    if dlinfo is None:
        return None
    try:
        handle = ctypes.CDLL(library, mode=os.RTLD_NOW | _RTLD_NOLOAD)._handle
    except OSError:
        return None
    head = _SerInfoHead()
    if dlinfo(ctypes.c_void_p(handle), _RTLD_DI_SERINFOSIZE, ctypes.byref(head)) != 0:
        return None

    class SerInfo(ctypes.Structure):
        _fields_ = [
            ("dls_size", ctypes.c_size_t),
            ("dls_cnt", ctypes.c_uint),
            ("dls_serpath", _SerPath * head.dls_cnt),
        ]

    buf = ctypes.create_string_buffer(max(head.dls_size, ctypes.sizeof(SerInfo)))
    info = SerInfo.from_buffer(buf)
    info.dls_size, info.dls_cnt = head.dls_size, head.dls_cnt
    if dlinfo(ctypes.c_void_p(handle), _RTLD_DI_SERINFO, ctypes.byref(info)) != 0:
        return None
    return [p.dls_name.decode(errors="replace") for p in info.dls_serpath if p.dls_name]


def classify_search_path(dirs: list[str], ld_library_path: str) -> list[dict[str, str]]:
    """[{"dir", "source"}] for a loader search path: source is "LD_LIBRARY_PATH", "RUNPATH" or
    "default" (LD_LIBRARY_PATH entries come first, the default dirs last, RUNPATH between)."""
    env = [d for d in ld_library_path.split(":") if d]
    lead = 0
    while lead < len(dirs) and lead < len(env) and dirs[lead] == env[lead]:
        lead += 1
    tail = len(dirs)
    while tail > lead and _DEFAULT_DIR.match(dirs[tail - 1]):
        tail -= 1
    out = []
    for i, d in enumerate(dirs):
        source = "LD_LIBRARY_PATH" if i < lead else ("RUNPATH" if i < tail else "default")
        out.append({"dir": d, "source": source})
    return out


def _cudnn_version(lib: ctypes.CDLL) -> int | None:
    """``cudnnGetVersion()`` of a loaded cuDNN (e.g. 90300 for 9.3.0); None if it has none."""
    try:
        fn = lib.cudnnGetVersion
    except AttributeError:
        return None
    fn.restype = ctypes.c_size_t
    fn.argtypes = []
    version = int(fn())
    return version or None


def _open(name: str, soname: str, candidate: str, via: str) -> dict[str, Any]:
    lib = ctypes.CDLL(candidate)  # raises OSError
    out: dict[str, Any] = {
        "name": name,
        "soname": soname,
        "loaded": True,
        "path": _loaded_path(lib) or candidate,
        "error": None,
        "via": via,
    }
    if name == "cudnn":
        out["version"] = _cudnn_version(lib)
    return out


def check_library(
    name: str,
    soname: str,
    search: list[dict[str, str]] | None,
    pip_dirs: list[str] | None = None,
) -> dict[str, Any]:
    """dlopen ``soname`` the way TensorFlow's loader finds it and report where it was found.

    ``search`` is the loader's search path of TF's framework library (classify_search_path):
    each directory is tried by full path in order, then the bare soname (the ld.so cache, and
    a library of that soname something already loaded). None (unknown search path) tries
    ``pip_dirs`` first, as an approximation. A library not found is also looked for in
    ``pip_dirs``: copies there that the loader does not search are ``found_elsewhere``.
    Returns {"name", "soname", "loaded", "path", "error", "via", ...}; never raises.
    """
    errors: list[str] = []
    if search is None:
        search = [{"dir": d, "source": "pip"} for d in pip_dirs or []]
    searched = set()
    for entry in search:
        candidate = os.path.join(entry["dir"], soname)
        searched.add(os.path.realpath(entry["dir"]))
        if not os.path.exists(candidate):
            continue
        try:
            return _open(name, soname, candidate, entry["source"])
        except OSError as exc:  # e.g. a file of another ELF class: the loader goes on too
            errors.append(str(exc))
    try:
        return _open(name, soname, soname, "ld.so.cache")
    except OSError as exc:
        errors.append(str(exc))
    elsewhere = [
        os.path.join(d, soname)
        for d in pip_dirs or []
        if os.path.exists(os.path.join(d, soname)) and os.path.realpath(d) not in searched
    ]
    return {
        "name": name,
        "soname": soname,
        "loaded": False,
        "path": None,
        "error": errors[-1],
        "via": None,
        "found_elsewhere": elsewhere,
    }


def other_cudnn(search: list[dict[str, str]] | None, pip_dirs: list[str], want: str) -> list[Any]:
    """Other cuDNN majors on the search path or in pip's dirs, when ``want`` is missing:
    [{"soname", "path", "version"}] (TF asks for one major only; e.g. cuDNN 8 beside TF 2.21)."""
    dirs = [e["dir"] for e in search or []] + pip_dirs
    found: list[Any] = []
    seen = set()
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(d, "libcudnn.so.[0-9]*"))):
            soname = os.path.basename(path)
            if soname == want or not re.fullmatch(r"libcudnn\.so\.\d+", soname):
                continue
            real = os.path.realpath(path)
            if real in seen or len(found) >= 4:
                continue
            seen.add(real)
            try:
                version = _cudnn_version(ctypes.CDLL(path))
            except OSError:
                version = None
            found.append({"soname": soname, "path": real, "version": version})
    return found


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


def _smoke(tf: Any, gpus: list[Any]) -> tuple[bool, str | None, str | None]:
    """(ok, error, stage): stage "context" when TF could not initialise GPU:0 (create its CUDA
    context), "matmul" when the device came up but the computation failed."""
    stage = "context"
    try:
        # Only the first GPU gets a context: the others stay untouched by the smoke test.
        tf.config.set_visible_devices(gpus[0], "GPU")
        tf.config.experimental.set_memory_growth(gpus[0], True)
        tf.config.list_logical_devices("GPU")  # initialises GPU:0: its context, nothing else
        stage = "matmul"
        with tf.device("/GPU:0"):
            x = tf.constant([[1.0, 2.0], [3.0, 4.0]])
            y = tf.linalg.matmul(x, x)
        if [list(r) for r in y.numpy().tolist()] != [[7.0, 10.0], [15.0, 22.0]]:
            return False, f"matmul on GPU:0 gave a wrong result: {y.numpy().tolist()!r}", stage
        if "GPU" not in y.device:
            return False, f"matmul ran on {y.device}, not on GPU:0", stage
        return True, None, None
    except Exception as exc:  # noqa: BLE001 - any failure of the smoke test is its result
        return False, f"{type(exc).__name__}: {exc}", stage


def _fingerprint_dirs(libraries: list[dict[str, Any]], ld_library_path: str) -> list[str]:
    """Directories whose mtime changes when a CUDA library is added or removed there: those
    the libraries were loaded from, and the LD_LIBRARY_PATH entries (bounded)."""
    dirs: list[str] = []
    for d in [os.path.dirname(lib["path"]) for lib in libraries if lib.get("path")] + [
        d for d in ld_library_path.split(":") if d
    ]:
        if d not in dirs and os.path.isdir(d) and len(dirs) < 16:
            dirs.append(d)
    return dirs


def _libraries(tf: Any, build: dict[str, Any], out: dict[str, Any]) -> list[dict[str, Any]]:
    """Check every library the build dlopens from where TF's loader searches, and say where
    that is (``loader``: the calling library and its search path)."""
    pip_dirs = pip_library_dirs(sys.path)
    framework = framework_library(tf)
    dirs = search_path(framework) if framework else None
    search = (
        classify_search_path(dirs, os.environ.get("LD_LIBRARY_PATH", ""))
        if dirs is not None
        else None
    )
    out["loader"] = {"object": framework, "search_path": search}
    out["library_search_dirs"] = [e["dir"] for e in search] if search is not None else pip_dirs
    libs = [check_library(n, s, search, pip_dirs) for n, s in sonames(build)]
    for lib in libs:
        if lib["name"] == "cudnn" and not lib["loaded"]:
            lib["other_versions"] = other_cudnn(search, pip_dirs, lib["soname"])
    return libs


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
        out["libraries"] = [check_library("cuda", "libcuda.so.1", None, pip_dirs)]
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
    try:
        out["libraries"] = _libraries(tf, build, out)
    except Exception as exc:  # noqa: BLE001 - report, never die: the parent needs the rest
        out["libraries_error"] = f"{type(exc).__name__}: {exc}"
    try:
        for d in _fingerprint_dirs(out.get("libraries", []), os.environ.get("LD_LIBRARY_PATH", "")):
            if d not in pkg_dirs:
                pkg_dirs.append(d)
    except Exception:  # noqa: BLE001 - the fingerprint is a nicety: never lose the report
        pass
    if smoke and gpus:
        ok, error, stage = _smoke(tf, gpus)
        out["smoke"] = {"ok": ok, "error": error, "stage": stage}
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
