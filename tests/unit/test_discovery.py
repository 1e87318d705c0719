"""Discovery of TensorFlow envs, on real directory trees made by each test.

The trees live under a scratch ``fsroot``; every path the discovery is given or reads from a
file (roots, homes, environments.txt, kernel.json) is a path inside it, as on a real machine.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tfgpud.collectors.discovery import (
    DiscoveredEnv,
    DiscoveryResult,
    Distribution,
    EnvKind,
    EnvSource,
    ProbeAs,
    Requirement,
    base_label,
    discover_envs,
    env_labels,
    merge_envs,
    metadata_facts,
    plan_probe,
    searched_lines,
)
from tfgpud.config import ConfigError, DiscoverConfig, TfEnvConfig, parse_config

ROOT = Path(__file__).resolve().parents[2]
PYTHON = os.path.realpath(sys.executable)  # what a venv's bin/python links to; never run


# --- building trees -----------------------------------------------------------------------------


def dist_info(
    site: Path, name: str, version: str, *, requires: Sequence[str] = (), top: str | None = None
) -> Path:
    """``name-version.dist-info`` with METADATA (headers, then a description) and top_level
    (default: the name as a package, ``tensorflow-hub`` -> ``tensorflow_hub``)."""
    d = site / f"{name.replace('-', '_')}-{version}.dist-info"
    d.mkdir(parents=True)
    headers = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    headers += [f"Requires-Dist: {r}" for r in requires]
    # A header-like line in the description must not be read as a header.
    (d / "METADATA").write_text("\n".join(headers) + "\n\nName: not-this\nVersion: 0\n")
    (d / "top_level.txt").write_text((top or name.replace("-", "_")) + "\n")
    return d


def make_prefix(
    fs: Path,
    path: str,
    *,
    marker: str = "venv",
    tf: tuple[str, str] | None = ("tensorflow", "2.21.0"),
    py: str = "3.11",
    extra: Sequence[tuple[str, str]] = (),
    requires: Sequence[str] = (),
) -> Path:
    """A venv (``marker="venv"``) or conda env (``"conda"``) at ``path`` inside ``fs``."""
    prefix = fs / path.lstrip("/")
    site = prefix / "lib" / f"python{py}" / "site-packages"
    site.mkdir(parents=True)
    (prefix / "bin").mkdir()
    if marker == "venv":
        (prefix / "pyvenv.cfg").write_text(f"home = /usr/bin\nversion = {py}.4\n")
        (prefix / "bin" / "python").symlink_to(PYTHON)
        (prefix / "bin" / "python3").symlink_to("python")
    else:
        (prefix / "conda-meta").mkdir()
        (prefix / "conda-meta" / "history").write_text("")
        (prefix / "bin" / f"python{py}").write_text("")
        (prefix / "bin" / "python").symlink_to(f"python{py}")
    (site / "numpy").mkdir()
    dist_info(site, "numpy", "2.0.0")
    if tf is not None:
        dist_info(site, *tf, requires=requires, top="tensorflow")
        (site / "tensorflow").mkdir()
    for name, version in extra:
        dist_info(site, name, version)
    return prefix


def make_kernel(kdir: Path, name: str, argv: list[str], env: dict[str, str] | None = None) -> Path:
    d = kdir / name
    d.mkdir(parents=True)
    spec: dict[str, Any] = {"argv": argv, "display_name": name, "language": "python"}
    if env is not None:
        spec["env"] = env
    (d / "kernel.json").write_text(json.dumps(spec))
    return d / "kernel.json"


def make_system(fs: Path, prefix: str, py: str = "3.11") -> Path:
    """A Debian-like Python install: bin/python3 -> python3.X, lib/python3.X/os.py."""
    p = fs / prefix.lstrip("/")
    (p / "bin").mkdir(parents=True)
    (p / "bin" / f"python{py}").write_text("")
    (p / "bin" / "python3").symlink_to(f"python{py}")
    (p / "lib" / f"python{py}").mkdir(parents=True)
    (p / "lib" / f"python{py}" / "os.py").write_text("")
    return p


def settings(**kw: Any) -> DiscoverConfig:
    return DiscoverConfig(**kw)


def discover(
    fs: Path,
    *,
    homes: Sequence[str] = (),
    kernel_dirs: Sequence[str] = (),
    system_prefixes: Sequence[str] = (),
    **kw: Any,
) -> DiscoveryResult:
    return discover_envs(
        settings(**kw),
        fsroot=str(fs),
        homes=homes,
        kernel_dirs=kernel_dirs,
        system_prefixes=system_prefixes,
    )


def by_label(result: DiscoveryResult) -> dict[str, DiscoveredEnv]:
    return {e.env: e for e in result.envs}


@pytest.fixture
def fs(shared_tmp: Path) -> Path:
    """The tree's root: traversable by `nobody`, for the test that drops to it."""
    return shared_tmp


# --- what is found, and what is not -------------------------------------------------------------


def test_finds_venvs_conda_envs_and_installs_and_nothing_without_tensorflow(fs: Path) -> None:
    cudnn = 'nvidia-cudnn-cu12<10.0,>=9.3.0.75; extra == "and-cuda"'
    make_prefix(
        fs,
        "/home/alice/venvs/tf",
        extra=[("nvidia-cudnn-cu12", "9.3.0.75"), ("nvidia-cublas-cu12", "12.5.3.2")],
        requires=[cudnn, "numpy>=1.26"],
    )
    make_prefix(fs, "/home/alice/venvs/plain", tf=None)
    # Only ecosystem packages: not TensorFlow itself.
    make_prefix(
        fs,
        "/home/alice/venvs/hub",
        tf=None,
        extra=[("tensorflow-hub", "0.16.1"), ("tensorflow-io", "0.37"), ("tensorboard", "2.20")],
    )
    make_prefix(fs, "/home/bob/projects/x/.venv", tf=("tensorflow-cpu", "2.20.0"), py="3.12")
    make_prefix(fs, "/opt/conda", marker="conda", tf=None)
    make_prefix(fs, "/opt/conda/envs/gpu", marker="conda", tf=("tensorflow", "2.18.0"))
    # An unknown distribution counts when it installs the `tensorflow` package itself.
    custom = make_prefix(fs, "/srv/build", tf=None)
    dist_info(
        custom / "lib/python3.11/site-packages", "tensorflow-custom", "2.19.0", top="tensorflow"
    )

    result = discover(fs)

    envs = by_label(result)
    assert sorted(envs) == [
        "alice-venvs-tf",
        "bob-projects-x-venv",
        "opt-conda-envs-gpu",
        "srv-build",
    ]
    tf = envs["alice-venvs-tf"]
    assert tf.kind is EnvKind.VENV
    assert tf.python == str(fs / "home/alice/venvs/tf/bin/python")
    assert tf.prefix == str(fs / "home/alice/venvs/tf")
    assert tf.source == "/home/alice/venvs/tf/pyvenv.cfg"
    assert tf.tensorflow == Distribution("tensorflow", "2.21.0")
    assert tf.python_version == "3.11.4"
    assert tf.site_packages == str(fs / "home/alice/venvs/tf/lib/python3.11/site-packages")
    assert tf.cuda_wheels == (
        Distribution("nvidia-cublas-cu12", "12.5.3.2"),
        Distribution("nvidia-cudnn-cu12", "9.3.0.75"),
    )
    assert tf.cuda_requirements == (Requirement("nvidia-cudnn-cu12", "<10.0,>=9.3.0.75"),)
    assert (tf.owner_uid, tf.owner) == (os.geteuid(), pwd.getpwuid(os.geteuid()).pw_name)
    assert envs["bob-projects-x-venv"].tensorflow == Distribution("tensorflow-cpu", "2.20.0")
    assert envs["bob-projects-x-venv"].python_version == "3.12.4"
    gpu = envs["opt-conda-envs-gpu"]
    assert gpu.kind is EnvKind.CONDA and gpu.python == str(fs / "opt/conda/envs/gpu/bin/python")
    assert gpu.python_version == "3.11"  # from lib/python3.11: conda has no pyvenv.cfg
    assert envs["srv-build"].tensorflow == Distribution("tensorflow-custom", "2.19.0")
    assert result.found == 4 and result.truncated == () and result.unreadable == 0
    assert [(p.path, p.state) for p in result.searched] == [
        ("/home", "searched"),
        ("/opt", "searched"),
        ("/srv", "searched"),
        ("/root", "missing"),
    ]


def test_conda_off_skips_envs_of_installs(fs: Path) -> None:
    make_prefix(fs, "/opt/conda", marker="conda", tf=None)
    make_prefix(fs, "/opt/conda/envs/gpu", marker="conda")
    assert [e.env for e in discover(fs).envs] == ["opt-conda-envs-gpu"]
    assert discover(fs, conda=False).envs == ()  # the install is not entered


def test_a_python_install_is_found_and_not_entered_a_home_with_bin_and_lib_is(fs: Path) -> None:
    pyenv = make_system(fs, "/root/.pyenv/versions/3.11.7")
    site = pyenv / "lib/python3.11/site-packages"
    dist_info(site, "tf-nightly", "2.22.0.dev20251201")
    make_prefix(fs, "/root/.pyenv/versions/3.11.7/lib/python3.11/venv-inside", tf=None)
    # A home with ~/bin and ~/lib that is no Python install: walked as usual.
    (fs / "home/carol/bin").mkdir(parents=True)
    (fs / "home/carol/lib").mkdir()
    make_prefix(fs, "/home/carol/env")

    envs = by_label(discover(fs))

    assert sorted(envs) == ["carol-env", "root-pyenv-versions-3.11.7"]
    nightly = envs["root-pyenv-versions-3.11.7"]
    assert nightly.kind is EnvKind.SYSTEM
    assert nightly.python == str(pyenv / "bin/python3")
    assert nightly.tensorflow == Distribution("tf-nightly", "2.22.0.dev20251201")


def test_system_interpreter_with_debian_dist_packages(fs: Path) -> None:
    make_system(fs, "/usr")
    site = fs / "usr/local/lib/python3.11/dist-packages"
    dist_info(site, "tensorflow", "2.15.1")
    dist_info(site, "nvidia-cudnn-cu12", "8.9.4.25")

    result = discover(fs, roots=(), system_prefixes=("/usr", "/usr/local"))

    (env,) = result.envs
    assert (env.env, env.kind, env.python) == ("usr", EnvKind.SYSTEM, str(fs / "usr/bin/python3"))
    assert env.site_packages == str(site) and env.python_version == "3.11"
    assert env.cuda_wheels == (Distribution("nvidia-cudnn-cu12", "8.9.4.25"),)
    assert [(p.path, p.what, p.state) for p in result.searched] == [
        ("/usr", "system", "searched"),
        ("/usr/local", "system", "searched"),  # no interpreter there: nothing found
    ]
    assert discover(fs, roots=(), system=False, system_prefixes=("/usr",)).envs == ()
    # In Debian's unversioned dist-packages: the version of the interpreter's name.
    shutil.rmtree(site)
    dist_info(fs / "usr/lib/python3/dist-packages", "tensorflow", "2.15.1")
    (env,) = discover(fs, roots=(), system_prefixes=("/usr",)).envs
    assert env.python_version == "3.11" and env.site_packages.endswith("python3/dist-packages")


def test_two_tensorflow_distributions_the_newest_installed_is_the_one(fs: Path) -> None:
    prefix = make_prefix(fs, "/home/a/env", tf=("tensorflow", "2.21.0"))
    site = prefix / "lib/python3.11/site-packages"
    cpu = dist_info(site, "tensorflow-cpu", "2.20.0")
    os.utime(site / "tensorflow-2.21.0.dist-info", ns=(10**18, 10**18))
    os.utime(cpu, ns=(2 * 10**18, 2 * 10**18))
    (env,) = discover(fs).envs
    assert env.tensorflow == Distribution("tensorflow-cpu", "2.20.0")
    assert env.other_tensorflow == (Distribution("tensorflow", "2.21.0"),)


# --- environments.txt and kernelspecs -----------------------------------------------------------


def test_environments_txt_entries_are_followed_anywhere_if_real_conda_dirs(fs: Path) -> None:
    make_prefix(fs, "/data/alice/envs/gpu", marker="conda", tf=("tensorflow", "2.20.0"))
    make_prefix(fs, "/data/alice/plainvenv")  # TF, but no conda-meta: not a conda env
    other = make_prefix(fs, "/data/bob/envs/other", marker="conda")  # listed only via a link
    (fs / "data/alice/link").symlink_to(other)
    listing = fs / "home/alice/.conda/environments.txt"
    listing.parent.mkdir(parents=True)
    listing.write_text(
        "\n".join(
            [
                "/data/alice/envs/gpu",
                "/data/alice/link",
                "/data/alice/plainvenv",
                "relative/env",
                "/does/not/exist",
                "",
            ]
        )
    )

    result = discover(fs, roots=(), homes=("/home/alice", "/home/nobody-here"))

    (env,) = result.envs
    assert (env.env, env.kind) == ("data-alice-envs-gpu", EnvKind.CONDA)
    assert env.source == "/home/alice/.conda/environments.txt"
    assert result.homes == 1  # the home that does not exist is not counted
    assert result.unreadable == 0  # a listed path that is gone is not "unreadable"
    assert discover(fs, roots=(), homes=("/home/alice",), conda=False).envs == ()


def test_kernelspecs_count_when_their_interpreter_holds_tensorflow(fs: Path) -> None:
    make_prefix(fs, "/data/k1")  # outside every root: found only through its kernelspec
    make_prefix(fs, "/data/notf", tf=None)
    walked = make_prefix(fs, "/home/bob/venv")
    system = fs / "usr/share/jupyter/kernels"
    spec = make_kernel(
        system,
        "tf",
        ["/data/k1/bin/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        env={"CUDA_VISIBLE_DEVICES": "0"},
    )
    make_kernel(system, "notf", ["/data/notf/bin/python", "-m", "ipykernel_launcher"])
    make_kernel(system, "wrapper", ["/usr/bin/env", "python3", "-m", "ipykernel_launcher"])
    make_kernel(system, "r", ["/data/k1/bin/R", "--slave"])
    (system / "broken").mkdir()
    (system / "broken" / "kernel.json").write_text("{not json")
    user = fs / "home/bob/.local/share/jupyter/kernels"
    make_kernel(user, "same", ["/home/bob/venv/bin/python3", "-m", "ipykernel_launcher"])

    result = discover(
        fs,
        roots=("/home",),
        homes=("/home/bob",),
        kernel_dirs=("/usr/share/jupyter/kernels", "/usr/local/share/jupyter/kernels"),
    )

    envs = by_label(result)
    assert sorted(envs) == ["bob-venv", "data-k1"]
    k1 = envs["data-k1"]
    assert (k1.kind, k1.kernel, k1.source) == (
        EnvKind.JUPYTER_KERNEL,
        "tf",
        "/usr/share/jupyter/kernels/tf/kernel.json",
    )
    assert k1.python == str(fs / "data/k1/bin/python") and spec.exists()
    assert dict(k1.kernel_environment) == {"CUDA_VISIBLE_DEVICES": "0"}
    # The user's kernel runs the venv the walk found: one env, found by the walk.
    assert envs["bob-venv"].kind is EnvKind.VENV and envs["bob-venv"].prefix == str(walked)
    assert [(p.path, p.state) for p in result.searched if p.what == "kernels"] == [
        ("/usr/share/jupyter/kernels", "searched"),
        ("/usr/local/share/jupyter/kernels", "missing"),
    ]
    assert (
        discover(fs, roots=(), jupyter=False, kernel_dirs=("/usr/share/jupyter/kernels",)).envs
        == ()
    )


def test_a_bare_python_in_a_kernelspec_is_resolved_like_jupyter_does(fs: Path) -> None:
    for prefix, version in (("/usr", "2.17.0"), ("/usr/local", "2.21.0")):
        make_system(fs, prefix)
        dist_info(fs / prefix.lstrip("/") / "lib/python3.11/site-packages", "tensorflow", version)
    # Installed into the /usr prefix: its own bin/python3, not the first on PATH.
    make_kernel(fs / "usr/share/jupyter/kernels", "sys", ["python3", "-m", "ipykernel_launcher"])
    (env,) = discover(fs, roots=(), system=False, kernel_dirs=("/usr/share/jupyter/kernels",)).envs
    assert (env.env, env.kind, env.tensorflow.version) == ("usr", EnvKind.JUPYTER_KERNEL, "2.17.0")
    # A user's kernelspec: the standard PATH, /usr/local/bin first.
    make_kernel(fs / "home/eve/.local/share/jupyter/kernels", "py", ["python3", "-f", "x"])
    (env,) = discover(fs, roots=(), system=False, homes=("/home/eve",)).envs
    assert (env.env, env.python) == ("usr-local", str(fs / "usr/local/bin/python3"))


# --- what the walk does not do ------------------------------------------------------------------


def test_symlink_loops_end_and_symlinks_out_of_the_root_are_not_followed(fs: Path) -> None:
    make_prefix(fs, "/home/bob/venv")
    (fs / "home/alice").mkdir(parents=True)
    (fs / "home/alice/loop").symlink_to(fs / "home/alice")
    (fs / "home/alice/up").symlink_to("..")
    (fs / "home/alice/bobs").symlink_to("../bob/venv")  # inside the root: the same env
    outside = make_prefix(fs, "/elsewhere/venv")  # a TF env, but outside /home
    (fs / "home/alice/out").symlink_to(outside)
    (fs / "home/alice/outdir").symlink_to(outside.parent)

    result = discover(fs, roots=("/home",))

    # Reached first through alice/bobs, named by where it is.
    assert [(e.env, e.prefix) for e in result.envs] == [("bob-venv", str(fs / "home/bob/venv"))]
    assert result.symlinks_not_followed == 2
    # /home, alice, bob, the venv (once, through alice/bobs) and its site-packages: every
    # directory listed once, the loops (alice/loop, alice/up) not again.
    assert result.dirs_visited == 5


def test_unreadable_home_is_counted_and_skipped_the_rest_is_found(fs: Path) -> None:
    make_prefix(fs, "/home/alice/env")
    make_prefix(fs, "/home/carol/secret")
    (fs / "home/carol").chmod(0o000)

    found = _discover_unprivileged(fs)

    assert found["envs"] == ["alice-env"]
    assert found["unreadable"] == 1
    assert found["unreadable_paths"] == ["/home/carol: Permission denied"]


def _discover_unprivileged(fs: Path) -> dict[str, Any]:
    """discover() in a process where permission bits hold: as `nobody` when we are root."""
    if os.geteuid() != 0:
        r = discover(fs, roots=("/home",), homes=("/home/alice", "/home/carol"))
        return {"envs": [e.env for e in r.envs], **_counts(r)}
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, discover, report, exit without cleanup
        code = 1
        try:
            os.close(read_end)
            nobody = pwd.getpwnam("nobody")
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            r = discover(fs, roots=("/home",), homes=("/home/alice", "/home/carol"))
            os.write(
                write_end, json.dumps({"envs": [e.env for e in r.envs], **_counts(r)}).encode()
            )
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data
    value: dict[str, Any] = json.loads(data)
    return value


def _counts(r: DiscoveryResult) -> dict[str, Any]:
    return {"unreadable": r.unreadable, "unreadable_paths": list(r.unreadable_paths)}


def _ten_thousand_files(fs: Path) -> int:
    """/home/alice/data with 10,000 files, /home/zed/tf a TF venv; entries of its site."""
    data = fs / "home/alice/data"
    data.mkdir(parents=True)
    for i in range(10_000):
        (data / f"f{i:05}").touch()
    prefix = make_prefix(fs, "/home/zed/tf")
    return len(os.listdir(prefix / "lib/python3.11/site-packages"))


def test_ten_thousand_files_within_the_bounds_every_entry_counted(fs: Path) -> None:
    site = _ten_thousand_files(fs)
    result = discover(fs, roots=("/home",))
    assert [e.env for e in result.envs] == ["zed-tf"]
    # /home (2) + alice (1) + zed (1) + data (10,000) + the venv (3) + its site-packages.
    assert result.entries_seen == 2 + 1 + 1 + 10_000 + 3 + site
    assert result.dirs_visited == 6 and result.truncated == ()
    assert result.searched[0].entries == result.entries_seen


def test_ten_thousand_files_past_the_root_budget_stop_there(fs: Path) -> None:
    _ten_thousand_files(fs)
    result = discover(fs, roots=("/home",), max_entries_per_root=5_000)
    assert result.envs == ()  # breadth-first: data/ is listed before zed/tf
    assert result.entries_seen == 5_000
    assert result.searched[0].state == "truncated"
    assert result.truncated == ("/home: stopped after 5000 entries (max_entries_per_root)",)


def test_ten_thousand_files_in_one_dir_past_the_dir_bound(fs: Path) -> None:
    site = _ten_thousand_files(fs)
    result = discover(fs, roots=("/home",), max_entries_per_dir=1_000)
    assert [e.env for e in result.envs] == ["zed-tf"]
    assert result.entries_seen == 2 + 1 + 1 + 1_000 + 3 + site
    assert result.truncated == ("/home/alice/data: more than 1000 entries read",)


def test_max_depth(fs: Path) -> None:
    make_prefix(fs, "/home/a/1/2/3/4/venv")  # level 6: found
    make_prefix(fs, "/home/b/1/2/3/4/5/venv")  # level 7: not entered
    result = discover(fs, roots=("/home",), max_depth=6)
    assert [e.env for e in result.envs] == ["a-1-2-3-4-venv"]
    assert result.beyond_depth == 1
    assert [e.env for e in discover(fs, roots=("/home",), max_depth=7).envs] == [
        "a-1-2-3-4-venv",
        "b-1-2-3-4-5-venv",
    ]


def test_max_envs_keeps_the_first_by_path_and_says_so(fs: Path) -> None:
    for name in ("e", "d", "c", "b", "a"):
        make_prefix(fs, f"/srv/{name}")
    full = discover(fs, roots=("/srv",))
    capped = discover(fs, roots=("/srv",), max_envs=3)
    assert [e.env for e in full.envs] == ["srv-a", "srv-b", "srv-c", "srv-d", "srv-e"]
    assert capped.envs == full.envs[:3] and capped.found == 5
    assert capped.truncated == ("max_envs (3): 5 found, 2 not kept: srv-d, srv-e",)


# --- labels -------------------------------------------------------------------------------------


def test_labels_same_basename_collisions_and_long_paths(fs: Path) -> None:
    for path in ("/home/alice/tf", "/home/bob/tf", "/home/a-b/tf", "/home/a/b-tf"):
        make_prefix(fs, path)
    deep = "/srv/" + "/".join(["very-long-directory-name"] * 3) + "/.venv"
    make_prefix(fs, deep)

    first = discover(fs, roots=("/home", "/srv"))
    again = discover(fs, roots=("/home", "/srv"))

    labels = [e.env for e in first.envs]
    assert labels == [e.env for e in again.envs]  # stable
    assert len(set(labels)) == len(labels) == 5  # unique
    assert {"alice-tf", "bob-tf"} <= set(labels)
    twins = sorted(x for x in labels if x.startswith("a-b-tf-"))
    assert len(twins) == 2 and twins[0] != twins[1]  # both hashed: neither depends on order
    long = next(x for x in labels if "very" in x)
    assert len(long) <= 64 and long.endswith(base_label(deep)[-8:])
    for label in labels:
        TfEnvConfig(name=label, python="/x")  # within the configured-name rules


def test_label_rules() -> None:
    assert base_label("/home/alice/proj/.venv") == "alice-proj-venv"
    assert base_label("/opt/conda/envs/tf 2.x (gpu)") == "opt-conda-envs-tf_2.x_gpu_"
    assert base_label("/usr") == "usr"
    assert base_label("/home") == "home"
    labels = env_labels(["/srv/x/tf", "/srv/x-tf", "/srv/y"])
    assert labels["/srv/y"] == "srv-y"
    assert labels["/srv/x/tf"] != labels["/srv/x-tf"]
    assert env_labels(["/srv/x/tf"]) == {"/srv/x/tf": "srv-x-tf"}


# --- configured envs win ------------------------------------------------------------------------


def test_configured_envs_win_over_discovered_duplicates(fs: Path) -> None:
    make_prefix(fs, "/home/alice/tf")
    make_prefix(fs, "/home/bob/tf")
    found = discover(fs, roots=("/home",)).envs
    configured = [
        # The same env by another of its names (bin/python3 -> python): a duplicate.
        TfEnvConfig(name="research", python=str(fs / "home/alice/tf/bin/python3"), run_as="alice"),
        # A configured name equal to a discovered label of another env.
        TfEnvConfig(name="bob-tf", python="/opt/other/bin/python"),
    ]

    targets = merge_envs(configured, found)

    assert [(t.config.name, t.source) for t in targets[:2]] == [
        ("research", EnvSource.CONFIGURED),
        ("bob-tf", EnvSource.CONFIGURED),
    ]
    (bob,) = targets[2:]
    assert bob.source is EnvSource.DISCOVERED and bob.discovered == found[1]
    assert bob.config.name.startswith("bob-tf-") and len(bob.config.name) == len("bob-tf-") + 8
    assert bob.config.python == str(fs / "home/bob/tf/bin/python")
    assert [t.config.name for t in merge_envs([], found)] == ["alice-tf", "bob-tf"]


def test_a_kernels_environment_reaches_its_probe_config(fs: Path) -> None:
    make_prefix(fs, "/data/k")
    kdir = fs / "usr/share/jupyter/kernels"
    make_kernel(kdir, "k", ["/data/k/bin/python"], env={"CUDA_VISIBLE_DEVICES": ""})
    found = discover(fs, roots=(), kernel_dirs=("/usr/share/jupyter/kernels",)).envs
    (target,) = merge_envs([], found)
    assert target.config.environment == {"CUDA_VISIBLE_DEVICES": ""}


# --- metadata alone -----------------------------------------------------------------------------


def _env(**kw: Any) -> DiscoveredEnv:
    base: dict[str, Any] = {
        "env": "e",
        "python": "/e/bin/python",
        "prefix": "/e",
        "kind": EnvKind.VENV,
        "source": "/e/pyvenv.cfg",
        "owner_uid": 1000,
        "owner": "alice",
        "tensorflow": Distribution("tensorflow", "2.21.0"),
        "site_packages": "/e/lib/python3.11/site-packages",
        "python_version": "3.11.4",
    }
    return DiscoveredEnv(**{**base, **kw})


@pytest.mark.parametrize(
    ("tf", "python", "supported", "tested"),
    [
        ("2.21.0", "3.13.1", True, "3.10-3.13"),
        ("2.21.0", "3.9.18", False, "3.10-3.13"),
        ("2.20.0", "3.9", True, "3.9-3.13"),
        ("2.19.0", "3.13.0", False, "3.9-3.12"),
        ("2.16.1", "3.12", True, "3.9-3.12"),
        ("2.15.0", "3.12.1", False, "3.9-3.11"),
        ("2.14.1", "3.11", True, "3.9-3.11"),
        ("2.12.0", "3.8.10", True, "3.8-3.11"),
        ("2.10.1", "3.11", False, "3.7-3.10"),
        ("2.99.0", "3.11", None, None),
        ("2.21.0", None, None, "3.10-3.13"),
    ],
)
def test_python_against_the_releases_tested_range(
    tf: str, python: str | None, supported: bool | None, tested: str | None
) -> None:
    facts = metadata_facts(_env(tensorflow=Distribution("tensorflow", tf), python_version=python))
    assert (facts.python_supported, facts.supported_python) == (supported, tested)
    if supported is False:
        assert any("OUTSIDE" in line for line in facts.lines)


def test_cuda_wheels_against_tensorflows_and_cuda_extra() -> None:
    facts = metadata_facts(
        _env(
            cuda_wheels=(
                Distribution("nvidia-cublas-cu12", "12.5.3.2"),
                Distribution("nvidia-cudnn-cu12", "8.9.7.29"),
            ),
            cuda_requirements=(
                Requirement("nvidia-cublas-cu12", "<13.0,>=12.5.3.2"),
                Requirement("nvidia-cudnn-cu12", "<10.0,>=9.3.0.75"),
                Requirement("nvidia-nccl-cu12", "<3.0,>=2.27.7"),
            ),
        )
    )
    assert [(c.name, c.installed, c.satisfied) for c in facts.cuda_checks] == [
        ("nvidia-cublas-cu12", "12.5.3.2", True),
        ("nvidia-cudnn-cu12", "8.9.7.29", False),
        ("nvidia-nccl-cu12", None, None),
    ]
    assert facts.cpu_only_build is False
    text = "\n".join(facts.lines)
    assert "nvidia-cudnn-cu12 8.9.7.29 (wants <10.0,>=9.3.0.75)" in text
    assert "missing from TensorFlow's [and-cuda]: nvidia-nccl-cu12" in text


def test_cpu_only_distribution_and_unknown_builds() -> None:
    cpu = metadata_facts(_env(tensorflow=Distribution("tensorflow-cpu", "2.21.0")))
    assert cpu.cpu_only_build is True
    assert any("CPU-only build" in line for line in cpu.lines)
    assert not any("nvidia" in line for line in cpu.lines)
    gpu = metadata_facts(_env())
    assert gpu.cpu_only_build is False
    assert any("no nvidia-*-cu* wheels" in line for line in gpu.lines)
    odd = metadata_facts(_env(tensorflow=Distribution("tensorflow-custom", "2.21.0")))
    assert odd.cpu_only_build is None


def test_real_tensorflow_install_of_this_checkout() -> None:
    """This checkout's .venv holds TensorFlow 2.21 from PyPI: its real METADATA."""
    venv = Path(sys.prefix)
    if not (venv / "pyvenv.cfg").exists() or not list(
        venv.glob("lib/python3*/site-packages/tensorflow-*.dist-info")
    ):
        pytest.skip("tests not run from a venv holding TensorFlow")
    parent = str(venv.parent)
    result = discover_envs(
        DiscoverConfig(roots=(parent,), max_depth=1),
        homes=(),
        kernel_dirs=(),
        system_prefixes=(),
    )
    env = next(e for e in result.envs if e.prefix == str(venv))
    assert env.tensorflow.name == "tensorflow" and env.kind is EnvKind.VENV
    assert env.python_version == ".".join(map(str, sys.version_info[:3]))
    names = {r.name for r in env.cuda_requirements}
    assert {"nvidia-cudnn-cu12", "nvidia-cublas-cu12", "nvidia-cuda-runtime-cu12"} <= names
    facts = metadata_facts(env)
    assert facts.python_supported is True


# --- who may run a discovered env's probe -------------------------------------------------------

ROOT_DAEMON: dict[str, Any] = {"daemon_uid": 0, "daemon_user": "root", "can_switch_user": True}
USER_DAEMON: dict[str, Any] = {"daemon_uid": 998, "daemon_user": "tfgpud", "can_switch_user": False}
ALICE: dict[str, Any] = {"owner_uid": 1000, "owner": "alice", "owner_group": "alice"}
ROOT_OWNED: dict[str, Any] = {"owner_uid": 0, "owner": "root", "owner_group": None}


@pytest.mark.parametrize(
    ("daemon", "owner", "writers", "how", "user"),
    [
        (ROOT_DAEMON, ALICE, {"alice"}, ProbeAs.OWNER, "alice"),
        (ROOT_DAEMON, ALICE, {"alice", "group:alice"}, ProbeAs.OWNER, "alice"),
        (ROOT_DAEMON, ALICE, {"alice", "group:ml"}, ProbeAs.NOT_RUN, None),
        (ROOT_DAEMON, ALICE, {"alice", "everyone"}, ProbeAs.NOT_RUN, None),
        (ROOT_DAEMON, ALICE, {"alice", "bob"}, ProbeAs.NOT_RUN, None),
        (ROOT_DAEMON, ROOT_OWNED, set(), ProbeAs.UNPRIVILEGED, "nobody"),
        (ROOT_DAEMON, ROOT_OWNED, {"bob"}, ProbeAs.NOT_RUN, None),
        ({**ROOT_DAEMON, "can_switch_user": False}, ROOT_OWNED, set(), ProbeAs.NOT_RUN, None),
        (USER_DAEMON, ROOT_OWNED, set(), ProbeAs.SELF, None),
        (USER_DAEMON, ALICE, {"alice"}, ProbeAs.NOT_RUN, None),
        ({**USER_DAEMON, "can_switch_user": True}, ALICE, {"alice"}, ProbeAs.OWNER, "alice"),
        ({**USER_DAEMON, "daemon_uid": 1000}, ALICE, {"alice"}, ProbeAs.SELF, None),
        (
            ROOT_DAEMON,
            {"owner_uid": 4242, "owner": None, "owner_group": None},
            {"uid 4242"},
            ProbeAs.NOT_RUN,
            None,
        ),
    ],
)
def test_probe_plan_never_more_privilege_than_the_owner(
    daemon: dict[str, Any], owner: dict[str, Any], writers: set[str], how: ProbeAs, user: str | None
) -> None:
    plan = plan_probe(**daemon, **owner, writers=writers)
    assert (plan.how, plan.user) == (how, user), plan.reason
    assert plan.reason
    if how is ProbeAs.NOT_RUN and writers - {"alice", "group:alice", "uid 4242"}:
        assert all(w in plan.reason for w in writers - {"alice"})


# --- configuration ------------------------------------------------------------------------------


def test_discover_table_defaults_are_the_contract() -> None:
    d = parse_config("").tensorflow.discover
    assert (d.enabled, d.roots, d.jupyter, d.conda, d.max_envs, d.interval_seconds) == (
        True,
        ("/home", "/opt", "/srv", "/root"),
        True,
        True,
        32,
        3600,
    )
    text = """[[tensorflow.envs]]
name = "a"
python = "/a"

[tensorflow.discover]
roots = ["/data"]
max_envs = 4
"""
    cfg = parse_config(text)
    assert cfg.tensorflow.discover.roots == ("/data",) and cfg.tensorflow.envs[0].name == "a"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('roots = ["home"]', "absolute, normalised"),
        ('roots = ["/home/"]', "absolute, normalised"),
        ('roots = ["/home/../etc"]', "absolute, normalised"),
        ('roots = ["//home"]', "absolute, normalised"),
        ('roots = ["/home", "/home"]', "repeated: /home"),
        ("max_envs = 0", "max_envs"),
        ("max_depth = 0", "max_depth"),
        ("interval_seconds = 0", "interval_seconds"),
        ("colour = 1", "unknown key `tensorflow.discover.colour`"),
    ],
)
def test_discover_table_is_validated(line: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            f"[tensorflow]\ninterval_seconds = 60\n\n[tensorflow.discover]\n{line}\n", "t.toml"
        )
    text = "\n".join(info.value.problems)
    assert problem in text and "line 5" in text


def test_searched_lines_say_what_was_searched(fs: Path) -> None:
    (fs / "home/carol").mkdir(parents=True)
    lines = searched_lines(discover(fs, roots=("/home", "/srv"), homes=("/home/carol",)))
    assert lines[0] == "root /home: searched (1 entries)"
    assert lines[1] == "root /srv: missing"
    assert lines[2].startswith("1 home directories checked")


def test_fifos_and_devices_where_metadata_should_be_are_never_read(fs: Path) -> None:
    prefix = make_prefix(fs, "/home/a/env")
    meta = prefix / "lib/python3.11/site-packages/tensorflow-2.21.0.dist-info/METADATA"
    meta.unlink()
    os.mkfifo(meta)  # opened for reading, a FIFO without a writer blocks forever
    (prefix / "pyvenv.cfg").unlink()
    os.mkfifo(prefix / "pyvenv.cfg")
    kdir = fs / "usr/share/jupyter/kernels/k"
    kdir.mkdir(parents=True)
    (kdir / "kernel.json").symlink_to("/dev/zero")
    listing = fs / "home/a/.conda/environments.txt"
    listing.parent.mkdir()
    os.mkfifo(listing)

    results: list[DiscoveryResult] = []
    worker = threading.Thread(
        target=lambda: results.append(
            discover(fs, homes=("/home/a",), kernel_dirs=("/usr/share/jupyter/kernels",))
        ),
        daemon=True,  # left blocked if this ever regresses: the assertion says why
    )
    worker.start()
    worker.join(30)
    assert results, "discovery blocked on a FIFO"

    (env,) = results[0].envs  # named by its dist-info directory: METADATA is not a file
    assert env.tensorflow == Distribution("tensorflow", "2.21.0")
    assert env.python_version == "3.11"


def test_pseudo_filesystems_are_not_entered_from_root(fs: Path) -> None:
    make_prefix(fs, "/proc/1/root/venv")
    make_prefix(fs, "/run/user/1000/venv")
    make_prefix(fs, "/data/venv")
    result = discover(fs, roots=("/",))
    assert [e.env for e in result.envs] == ["data-venv"]


def test_disabled_searches_nothing(fs: Path) -> None:
    make_prefix(fs, "/home/a/env")
    result = discover(fs, enabled=False, homes=("/home/a",))
    assert (result.envs, result.dirs_visited, result.searched) == ((), 0, ())


def test_a_kernelspec_nested_past_the_json_parser_is_skipped(fs: Path) -> None:
    make_prefix(fs, "/data/k")
    kdir = fs / "usr/share/jupyter/kernels"
    make_kernel(kdir, "ok", ["/data/k/bin/python"])
    (kdir / "deep").mkdir()
    (kdir / "deep" / "kernel.json").write_text("[" * 60_000 + "]" * 60_000)
    found = discover(fs, roots=(), kernel_dirs=("/usr/share/jupyter/kernels",))
    assert [e.env for e in found.envs] == ["data-k"]
