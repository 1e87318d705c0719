"""Configuration: TOML file → validated pydantic models.

``load_config`` is the only entry point; it raises :class:`ConfigError` whose message names
the file, each offending key path (with its line where it can be found) and what was expected.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_CONFIG_PATH = Path("/etc/tfgpud/tfgpud.toml")
DEFAULT_LISTEN = "127.0.0.1:10041"
# Process names (globs) the workloads collector inspects for TensorFlow.
DEFAULT_PROCESS_NAMES = ("python*", "ipython*", "jupyter*", "*.py")
# Shortest poll interval: NVML, /proc and /sys at 10 Hz cost ~2 % of a core on 8 busy GPUs;
# 0 would spin a core.
MIN_INTERVAL_SECONDS = 0.1
# A configuration is a few KB; a bigger file is a mistake (or an attack on the parser).
MAX_CONFIG_BYTES = 1024 * 1024

# HTTP header field names are tokens; values are visible characters, spaces and tabs (RFC 9110).
HTTP_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\xa0-\xff]*")


class ConfigError(Exception):
    """An invalid or unreadable configuration. ``problems`` lists one line per problem."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        head = f"invalid configuration {self.path}:"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


def check_header_field(name: str, value: str) -> None:
    """Raise ValueError unless ``name: value`` can be sent as an HTTP header as it is."""
    if not HTTP_TOKEN.fullmatch(name):
        raise ValueError(
            f"header name {name!r} is not an HTTP token (letters, digits and !#$%&'*+-.^_`|~)"
        )
    if not _HEADER_VALUE.fullmatch(value):
        raise ValueError(
            f"header {name} has a control character (CR, LF, ...) or a character outside "
            "Latin-1 in its value; it cannot be sent"
        )


def read_bounded_text(path: Path, limit: int = MAX_CONFIG_BYTES) -> str:
    """The UTF-8 text of ``path``; raise ConfigError when unreadable, not UTF-8 or over ``limit``
    bytes (read no further than that)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror or exc}"]) from None
    if len(data) > limit:
        raise ConfigError(str(path), [f"larger than {limit // 1024} KiB; not a configuration"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [f"not UTF-8 text: {exc}"]) from None


NESTED_TOO_DEEPLY = (
    "values nested too deeply (arrays or inline tables inside each other hundreds of levels "
    "deep; no tfgpud setting nests more than two)"
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class DaemonConfig(_Section):
    interval_seconds: Annotated[float, Field(ge=MIN_INTERVAL_SECONDS, le=3600)] = 10.0
    state_dir: str = "/var/lib/tfgpud"
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class HttpConfig(_Section):
    listen: str = DEFAULT_LISTEN
    web_config_file: str | None = None

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_listen(value)
        return value


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port`` into (host, port); raise ValueError when malformed."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", value)
    if not m:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:10041 or [::1]:10041")
    host = m.group(1) if m.group(1) is not None else m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is outside 0-65535")
    if m.group(1) is not None:
        ipaddress.IPv6Address(host)
    return host, port


class NvmlConfig(_Section):
    library: str | None = None  # path to libnvidia-ml.so.1; default: the dynamic loader's search


class TfEnvConfig(_Section):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    python: Annotated[str, Field(min_length=1)]
    environment: dict[str, str] = Field(default_factory=dict)
    run_as: str | None = None
    # Opt-in: after listing GPUs the probe sets memory growth and runs a tiny matmul on GPU:0.
    smoke_test: bool = False


class DiscoverConfig(_Section):
    """``[tensorflow.discover]``: find TensorFlow envs nobody configured (metadata only)."""

    enabled: bool = True
    # Walked for venvs, conda envs and Python installs (bounded by the max_* keys below).
    roots: tuple[Annotated[str, Field(min_length=1, max_length=4096)], ...] = (
        "/home",
        "/opt",
        "/srv",
        "/root",
    )
    jupyter: bool = True  # kernelspecs in the standard data dirs and each user's ~/.local/share
    conda: bool = True  # each user's ~/.conda/environments.txt and envs/ of conda installs
    system: bool = True  # the system interpreters' own site-packages (/usr, /usr/local)
    max_envs: Annotated[int, Field(ge=1, le=256)] = 32
    interval_seconds: Annotated[float, Field(ge=1, le=7 * 86400)] = 3600.0
    # Directory levels below a root that are entered (an env at /home/alice/a/b/c/venv is 5).
    max_depth: Annotated[int, Field(ge=1, le=32)] = 6
    # Directory entries read per root (and once more for everything outside the roots).
    max_entries_per_root: Annotated[int, Field(ge=100, le=10_000_000)] = 200_000
    # Entries read from any one directory: a directory of a million data files costs no more.
    max_entries_per_dir: Annotated[int, Field(ge=100, le=1_000_000)] = 10_000

    @field_validator("roots")
    @classmethod
    def _check_roots(cls, roots: tuple[str, ...]) -> tuple[str, ...]:
        if len(roots) > 32:
            raise ValueError(f"at most 32 roots (got {len(roots)})")
        for root in roots:
            if not root.startswith("/") or root.startswith("//") or os.path.normpath(root) != root:
                raise ValueError(f"roots must be absolute, normalised paths (got {root!r})")
        dupes = sorted({r for r in roots if roots.count(r) > 1})
        if dupes:
            raise ValueError(f"roots must be unique; repeated: {', '.join(dupes)}")
        return roots


class TensorflowConfig(_Section):
    interval_seconds: Annotated[float, Field(ge=1)] = 21600.0
    timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 120.0
    # Probes running at once across envs (each imports TF: ~0.5-1 GB of RAM, seconds of CPU).
    max_concurrent_probes: Annotated[int, Field(ge=1, le=64)] = 1
    envs: list[TfEnvConfig] = Field(default_factory=list)
    discover: DiscoverConfig = Field(default_factory=DiscoverConfig)

    @field_validator("envs")
    @classmethod
    def _unique_names(cls, envs: list[TfEnvConfig]) -> list[TfEnvConfig]:
        names = [e.name for e in envs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"env names must be unique; repeated: {', '.join(dupes)}")
        return envs


class MemoryConfig(_Section):
    pressure_ratio: Annotated[float, Field(gt=0, le=1)] = 0.95
    for_seconds: Annotated[float, Field(ge=0)] = 300.0
    # A process holding this share of a GPU's memory while the GPU has been idle (utilisation
    # <= 5 %) for idle_seconds is `gpu-memory-held-idle`.
    idle_hold_ratio: Annotated[float, Field(gt=0, le=1)] = 0.5
    idle_seconds: Annotated[float, Field(ge=0)] = 1800.0


class WorkloadsConfig(_Section):
    enabled: bool = True
    # A TF process computing on the CPU this long while usable GPUs exist is `tf-job-on-cpu`.
    job_on_cpu_seconds: Annotated[float, Field(ge=0)] = 300.0
    # Only processes whose name (/proc/PID/comm, at most 15 characters) matches one of these
    # globs have their memory maps read; ["*"] inspects every process (costs more when cold).
    # Processes in NVML's compute process list are always inspected.
    process_names: tuple[Annotated[str, Field(min_length=1, max_length=64)], ...] = (
        DEFAULT_PROCESS_NAMES
    )
    # Export tfgpud_gpu_process_memory_bytes{pid,process}: one series per process, a new one
    # for every job (unbounded over time). Off: memory and counts by user and kind only.
    per_process_metrics: bool = False


class ExpectConfig(_Section):
    gpus: int | Literal["auto"] = "auto"

    @field_validator("gpus")
    @classmethod
    def _non_negative(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("must be 'auto' or a count >= 0")
        return value


class AlertmanagerConfig(_Section):
    url: Annotated[str, Field(pattern=r"^https?://")]
    timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 5.0


class WebhookConfig(_Section):
    url: Annotated[str, Field(pattern=r"^https?://")]
    timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 5.0
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("headers")
    @classmethod
    def _sendable(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            check_header_field(name, value)
        return headers


class AlertsConfig(_Section):
    alertmanager: list[AlertmanagerConfig] = Field(default_factory=list)
    webhook: list[WebhookConfig] = Field(default_factory=list)
    instance: str | None = None  # the `instance` label; default: the host name
    # A finding fires after it has held this long, and resolves after it has been gone this long.
    for_seconds: Annotated[float, Field(ge=0, le=86400)] = 30.0
    # Findings below this severity are logged on transition but not pushed to the sinks.
    min_severity: Literal["info", "warning", "critical"] = "warning"
    # Firing alerts are re-sent to Alertmanager this often (it expires alerts not refreshed).
    resend_seconds: Annotated[float, Field(ge=1, le=3600)] = 60.0
    # Undelivered messages per sink; beyond this the oldest is dropped (and counted). All sinks'
    # together are also bounded by what alerts.json holds (tfgpud.alerts.store.MAX_STATE_BYTES).
    queue_size: Annotated[int, Field(ge=1, le=100000)] = 1000
    # An undeliverable message is retried (backoff 1 s doubling to 60 s) this long, then dropped.
    max_retry_seconds: Annotated[float, Field(gt=0, le=7 * 86400)] = 3600.0


class Config(_Section):
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    nvml: NvmlConfig = Field(default_factory=NvmlConfig)
    tensorflow: TensorflowConfig = Field(default_factory=TensorflowConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    workloads: WorkloadsConfig = Field(default_factory=WorkloadsConfig)
    expect: ExpectConfig = Field(default_factory=ExpectConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)


_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")


def _headers(lines: list[str]) -> list[tuple[int, tuple[str, ...]]]:
    """(line index, dotted name split) of every ``[table]`` / ``[[array]]`` header."""
    out = []
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if m:
            out.append((i, tuple(p.strip().strip("\"'") for p in m.group(1).split("."))))
    return out


def _line_of(text: str, loc: tuple[str | int, ...]) -> int | None:
    """Best-effort line number (1-based) of the key at ``loc`` in the TOML source.

    Follows tables in order, including the N-th ``[[array]]`` table for an index in ``loc``;
    a key that is missing points at its table's header.
    """
    lines = text.splitlines()
    headers = _headers(lines)
    table: tuple[str, ...] = ()
    start, end = 0, headers[0][0] if headers else len(lines)
    j = 0
    while j < len(loc) and isinstance(loc[j], str):
        candidate = (*table, str(loc[j]))
        matches = [i for i, name in headers if name == candidate]
        nxt = loc[j + 1] if j + 1 < len(loc) else None
        index = nxt if isinstance(nxt, int) else None
        if (
            not matches
            and index is None
            and any(n[: len(candidate)] == candidate for _, n in headers)
        ):
            table, j = candidate, j + 1  # only implied by a dotted header like [tensorflow.envs]
            continue
        if not matches or (index is not None and index >= len(matches)):
            break
        start = matches[index or 0]
        end = next((i for i, _ in headers if i > start), len(lines))
        table = candidate
        j += 2 if index is not None else 1
    rest = [k for k in loc[j:] if isinstance(k, str)]
    if rest:
        key_pat = re.compile(rf"^\s*[\"']?{re.escape(rest[0])}[\"']?\s*=")
        for i in range(start, end):
            if key_pat.match(lines[i]):
                return i + 1
    return start + 1 if table else None


def _section_model(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model that holds the key at ``loc`` (``("daemon", "stat_dir")`` → DaemonConfig)."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # an index into an array of tables
        field = model.model_fields.get(part)
        if field is None:
            return None
        inner = _model_in(field.annotation)
        if inner is None:
            return None
        model = inner
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel in ``X``, ``list[X]``, ``X | None``, ``Annotated[X, …]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _did_you_mean(loc: tuple[str | int, ...]) -> str:
    """`` (did you mean `state_dir`?)`` for a misspelt key; empty when nothing is close."""
    model = _section_model(loc)
    if model is None or not loc or not isinstance(loc[-1], str):
        return ""
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _describe(err: Any, text: str) -> str:
    loc: tuple[str | int, ...] = tuple(err["loc"])
    path = ".".join(f"[{p}]" if isinstance(p, int) else p for p in loc).replace(".[", "[")
    line = _line_of(text, loc)
    where = f"line {line}: " if line else ""
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{where}unknown key `{path}`{_did_you_mean(loc)}"
    if kind == "missing":
        return f"{where}missing required key `{path}`"
    got = err.get("input")
    got_s = f" (got {got!r})" if got is not None and not isinstance(got, dict | list) else ""
    return f"{where}`{path}`: {err['msg']}{got_s}"


def parse_config(text: str, source: str = "<string>") -> Config:
    """Validate TOML ``text``; raise ConfigError listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"TOML syntax error: {exc}"]) from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigError(source, [NESTED_TOO_DEEPLY]) from None
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(e, text) for e in exc.errors()]) from None
    except RecursionError:
        raise ConfigError(source, [NESTED_TOO_DEEPLY]) from None


def load_config(path: str | Path) -> Config:
    """Read and validate the file at ``path``; raise ConfigError when unreadable or invalid.

    Relative paths inside the file (``state_dir``, an env's ``python``, ``[nvml] library``,
    ``web_config_file``) are resolved against the file's directory, so a config means the same
    thing whatever the daemon's working directory is.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(str(p), ["is a directory, expected a TOML file"])
    return _resolve_paths(parse_config(read_bounded_text(p), str(p)), p.resolve().parent)


def _resolve(base: Path, value: str | None) -> str | None:
    if value is None or value == "" or Path(value).is_absolute() or "/" not in value:
        return value  # absolute, or a bare command name looked up on PATH
    # normpath, not resolve(): a venv's python is a symlink and must stay one.
    return os.path.normpath(base / value)


def _as_path(value: str | None) -> str | None:
    return value if not value or "/" in value else f"./{value}"


def _resolve_paths(config: Config, base: Path) -> Config:
    state = config.daemon.state_dir
    if not Path(state).is_absolute():
        state = os.path.normpath(base / state)
    envs = [
        e.model_copy(update={"python": _resolve(base, e.python)}) for e in config.tensorflow.envs
    ]
    return config.model_copy(
        update={
            "daemon": config.daemon.model_copy(update={"state_dir": state}),
            "nvml": config.nvml.model_copy(update={"library": _resolve(base, config.nvml.library)}),
            "http": config.http.model_copy(
                # A file, never a command: "web-config.yml" is next to this file too.
                update={"web_config_file": _resolve(base, _as_path(config.http.web_config_file))}
            ),
            "tensorflow": config.tensorflow.model_copy(update={"envs": envs}),
        }
    )
