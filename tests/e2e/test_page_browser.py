"""The page at / in a real headless Chromium, served by the real daemon on the simulated driver.

Per state (healthy, memory nearly full, a lost GPU, a TF env on the CPU): the DOM as Chromium
built it with JavaScript off (the page must work without it), and a screenshot with it on, kept
under build/screenshots/ (a CI artifact). The healthy env is a stand-in interpreter that answers
the probe; the CPU env is the real TensorFlow of .venv, which finds no CUDA libraries.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import DaemonProcess
from helpers import REPO_ROOT, fake_tf_python, write_scenario

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = REPO_ROOT / "build" / "screenshots"
TF_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
U0 = "GPU-6f1d2c3a-0001-4a5b-9c8d-a6000a600001"
U1 = "GPU-6f1d2c3a-0002-4a5b-9c8d-a6000a600002"
TOTAL = 51527024640

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt install chromium)"),
]


# --- a small DOM from Chromium's --dump-dom ---------------------------------------------------


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list[Element] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        own = "".join(self.text_parts)
        return " ".join((own + " ".join(c.text for c in self.children)).split())

    def iter(self) -> Iterator[Element]:
        yield self
        for c in self.children:
            yield from c.iter()

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Element]:
        def match(e: Element) -> bool:
            if tag is not None and e.tag != tag:
                return False
            for k, v in attrs.items():
                key = k.rstrip("_").replace("_", "-")
                if key == "class":
                    if v not in e.attrs.get("class", "").split():
                        return False
                elif e.attrs.get(key) != v:
                    return False
            return True

        return [e for e in self.iter() if match(e)]

    def one(self, tag: str | None = None, **attrs: str) -> Element:
        hits = self.find_all(tag, **attrs)
        assert len(hits) == 1, f"expected one {tag} {attrs}, got {len(hits)}"
        return hits[0]


_VOID = {"meta", "link", "br", "hr", "img", "input", "col", "area", "base", "source", "wbr"}


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        e = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(e)
        if tag not in _VOID:
            self.stack.append(e)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].text_parts.append(data)


def parse(html: str) -> Element:
    b = _Builder()
    b.feed(html)
    return b.root


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # root in CI containers
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def no_javascript_profile(tmp: Path) -> Path:
    """A Chromium profile whose content settings block every page's JavaScript."""
    profile = tmp / "chromium-nojs"
    (profile / "Default").mkdir(parents=True, exist_ok=True)
    prefs = {"profile": {"default_content_setting_values": {"javascript": 2}}}
    (profile / "Default" / "Preferences").write_text(json.dumps(prefs))
    return profile


def look(d: DaemonProcess, state: str, tmp: Path) -> Element:
    """The page's DOM as Chromium builds it with JavaScript off, and a screenshot of it."""
    dom = chromium("--dump-dom", d.url + "/", profile=no_javascript_profile(tmp))
    assert dom.returncode == 0 and "<html" in dom.stdout, dom.stderr[-2000:]
    # JavaScript really was off: the copy buttons it would reveal are still hidden.
    assert 'class="copy">' not in dom.stdout
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / f"{state}.png"
    shot.unlink(missing_ok=True)
    out = chromium(
        "--window-size=1280,1500", f"--screenshot={shot}", d.url + "/", profile=tmp / "chromium"
    )
    assert out.returncode == 0 and shot.stat().st_size > 10_000, out.stderr[-2000:]
    return parse(dom.stdout)


def wait_status(
    d: DaemonProcess, pred: Callable[[dict[str, Any]], bool], timeout: float = 60.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status, body = d.get("/status")
        if status == 200:
            doc = json.loads(body)
            if pred(doc):
                return doc
        time.sleep(0.2)
    raise AssertionError(f"/status never matched; last: {doc}")


def gpu(uuid: str, index: int, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "NVIDIA RTX A6000",
        "uuid": uuid,
        "pci_bus_id": f"00000000:{1 + 0x40 * index:02x}:00.0",
        "memory_total": TOTAL,
        "memory_used": 2 * 1024**3 if index == 0 else 1048576,
        "utilization_gpu": 63 if index == 0 else 0,
        "temperature": 67 if index == 0 else 34,
        "power_mw": 212000 if index == 0 else 23000,
        "cc_major": 8,
        "cc_minor": 6,
    }
    base.update(kw)
    return base


def machine(path: Path, *gpus: dict[str, Any]) -> None:
    write_scenario(path, list(gpus), driver_version="550.54.15", cuda_driver_version=12040)


def common(d: Element) -> tuple[Element, datetime]:
    """What every state has: one verdict element with a state, the last poll as ISO 8601."""
    verdict = d.one(id="verdict")
    assert verdict.attrs["data-state"] in ("ok", "warning", "critical")
    polled = d.one("time", id="last-poll")
    when = datetime.fromisoformat(polled.attrs["datetime"].replace("Z", "+00:00"))
    assert when.tzinfo is not None
    return verdict, when


@pytest.fixture(scope="module")
def workstation(tmp_path_factory: pytest.TempPathFactory, fakedriver: Path) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("page")
    scenario = tmp / "scenario.toml"
    machine(scenario, gpu(U0, 0, process_pids=[4242], process_memory=[1900000000]), gpu(U1, 1))
    python = fake_tf_python(tmp / "python", 2)
    body = (
        f'[memory]\nfor_seconds = 0\n[[tensorflow.envs]]\nname = "research"\npython = "{python}"\n'
    )
    with DaemonProcess(tmp / "d", config_body=body, scenario=scenario, interval=0.5) as d:
        d.start()
        yield d, scenario, tmp


def test_healthy(workstation: Any) -> None:
    d, _, tmp = workstation
    wait_status(d, lambda s: any(t["status"] == "ok" for t in s.get("tensorflow", [])))
    dom = look(d, "healthy", tmp)
    verdict, _ = common(dom)
    assert verdict.attrs["data-state"] == "ok"
    assert verdict.text == "TensorFlow can use 2 of 2 GPUs"
    rows = dom.find_all("tr", class_="gpu")
    assert [r.attrs["data-state"] for r in rows] == ["ok", "ok"]
    first = rows[0].text
    assert "NVIDIA RTX A6000" in first and "63%" in first and "67 °C" in first
    assert "212 W" in first and "pid 4242" in first
    assert not dom.find_all("td", class_="full")
    env = dom.one("tr", class_="env")
    assert env.attrs["data-state"] == "ok" and "sees 2 of 2 GPUs" in env.text
    assert "probe ok" not in env.text
    assert "No findings." in dom.text
    # Prometheus scrapes while all is well: tfgpud_gpu_info of each GPU is complete.
    assert sum(1 for k in d.metrics() if k.startswith("tfgpud_gpu_info{")) == 2


def test_memory_nearly_full(workstation: Any) -> None:
    d, scenario, tmp = workstation
    used = int(TOTAL * 0.99)
    machine(
        scenario,
        gpu(
            U0, 0, memory_used=used, process_pids=[4242, 5151], process_memory=[used - 10**9, 10**9]
        ),
        gpu(U1, 1),
    )
    wait_status(d, lambda s: any(f["code"] == "gpu-memory-pressure" for f in s["findings"]))
    dom = look(d, "memory-nearly-full", tmp)
    verdict, _ = common(dom)
    assert verdict.attrs["data-state"] == "warning"
    assert verdict.text.startswith("TensorFlow can use 2 of 2 GPUs; ")
    full = dom.one("td", class_="full")
    assert full.attrs["data-ratio"] == "0.990" and "nearly full" in full.text and "99%" in full.text
    row = dom.one("tr", data_uuid=U0)
    assert "pid 4242" in row.text and "pid 5151" in row.text
    finding = dom.one("article", data_code="gpu-memory-pressure")
    assert finding.attrs["data-severity"] == "warning"
    commands = [c.text for c in _pre_codes(finding)]
    assert commands == ["nvidia-smi --query-compute-apps=pid,used_memory --format=csv"]


def _pre_codes(e: Element) -> list[Element]:
    return [c for pre in e.find_all("pre") for c in pre.find_all("code")]


def test_lost_gpu(workstation: Any) -> None:
    d, scenario, tmp = workstation
    machine(scenario, gpu(U0, 0), gpu(U1, 1, lost=True))
    wait_status(d, lambda s: any(f["code"] == "gpu-lost" for f in s["findings"]))
    dom = look(d, "lost-gpu", tmp)
    verdict, _ = common(dom)
    assert verdict.attrs["data-state"] == "critical"
    assert verdict.text.startswith("GPU 1 (NVIDIA RTX A6000) is lost; TensorFlow can use 1 of 2")
    lost = dom.one("tr", data_uuid=U1)
    assert lost.attrs["data-state"] == "lost" and "lost" in lost.one("span", class_="pill").text
    finding = dom.one("article", data_code="gpu-lost")
    assert finding.attrs["id"] == f"f-gpu-lost-{U1}"
    assert any("nvidia-smi -r -i 00000000:41:00.0" in c.text for c in _pre_codes(finding))
    # The metrics keep the lost GPU's identity (as last scraped) and count it.
    m = d.metrics()
    assert m['tfgpud_gpus{state="lost"}'] == 1 and m['tfgpud_gpus{state="ok"}'] == 1
    info = [k for k in m if k.startswith("tfgpud_gpu_info{") and U1 in k]
    assert info == [
        'tfgpud_gpu_info{compute_capability="8.6",gpu="1",name="NVIDIA RTX A6000",'
        f'pci_bus_id="00000000:41:00.0",uuid="{U1}"}}'
    ]


@pytest.mark.skipif(not TF_PYTHON.exists(), reason="no .venv with TensorFlow (make venv)")
def test_tf_env_on_the_cpu(tmp_path: Path, fakedriver: Path) -> None:
    scenario = tmp_path / "scenario.toml"
    machine(scenario, gpu(U0, 0), gpu(U1, 1))
    body = (
        "[tensorflow]\ntimeout_seconds = 120\n"
        f'[[tensorflow.envs]]\nname = "research"\npython = "{TF_PYTHON}"\n'
        f'environment = {{ LD_LIBRARY_PATH = "{fakedriver}", TFGPUD_FAKE_DRIVER = "{scenario}" }}\n'
    )
    with DaemonProcess(tmp_path / "d", config_body=body, scenario=scenario, interval=0.5) as d:
        d.start()
        wait_status(d, lambda s: any(t["status"] == "ok" for t in s.get("tensorflow", [])), 150)
        dom = look(d, "tf-env-on-cpu", tmp_path)
        assert d.stop() == 0
    verdict, _ = common(dom)
    assert verdict.attrs["data-state"] == "critical"
    sentence = dom.one("p", class_="sentence").text
    assert sentence == (
        "TensorFlow in env `research` runs on the CPU: its CUDA libraries are missing"
    )
    env = dom.one("tr", data_env="research")
    assert "sees 0 of 2 GPUs" in env.text and "probe ok" not in env.text
    fallback = dom.one("article", data_code="tf-cpu-fallback")
    cause = dom.one("article", data_code="tf-cuda-libs-missing")
    # The cause is a link to the cause's finding on this page.
    links = [a.attrs["href"] for a in fallback.one("div", class_="causes").find_all("a")]
    assert links == [f"#{cause.attrs['id']}"]
    # The fix is copyable code.
    assert [c.text for c in _pre_codes(cause)] == [
        f"{TF_PYTHON} -m pip install 'tensorflow[and-cuda]==2.21.0'"
    ]
    # Each TF log line is shown once on the page.
    lines = [li.text for li in dom.find_all("li") if li.find_all("code")]
    dlopen = [x for x in lines if "Cannot dlopen some GPU libraries" in x]
    assert len(dlopen) == 1
    assert len(lines) == len(set(lines))
