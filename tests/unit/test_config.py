from __future__ import annotations

from pathlib import Path

import pytest

from tfgpud.cli import EX_CONFIG, main
from tfgpud.config import Config, ConfigError, load_config, parse_config, parse_listen

ROOT = Path(__file__).resolve().parents[2]


def test_default_config_is_valid_and_matches_the_builtin_defaults() -> None:
    cfg = load_config(ROOT / "config" / "tfgpud.toml")
    assert cfg == Config()
    assert cfg.http.listen == "127.0.0.1:10041"
    assert cfg.tensorflow.interval_seconds == 21600


def test_local_config_resolves_paths_against_its_directory() -> None:
    cfg = load_config(ROOT / "config" / "local.toml")
    assert cfg.tensorflow.envs[0].python == str(ROOT / ".venv" / "bin" / "python")
    assert cfg.daemon.state_dir == str(ROOT / ".state")


def test_make_run_discovers_envs_and_the_demo_does_not() -> None:
    assert load_config(ROOT / "config" / "local.toml").tensorflow.discover.enabled
    demo = (ROOT / "config" / "demo" / "demo.toml.in").read_text().replace("@ROOT@", str(ROOT))
    assert not parse_config(demo).tensorflow.discover.enabled  # never the developer's machine


def test_every_problem_is_reported_with_key_path_and_line() -> None:
    text = """
[daemon]
interval_seconds = "often"
colour = "blue"

[[tensorflow.envs]]
name = "research"
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "x.toml")
    problems = info.value.problems
    joined = "\n".join(problems)
    assert "line 3: `daemon.interval_seconds`" in joined
    assert "line 4: unknown key `daemon.colour`" in joined
    assert "missing required key `tensorflow.envs[0].python`" in joined
    assert len(problems) == 3


def test_toml_syntax_error_names_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("[daemon]\ninterval_seconds = = 3\n", "bad.toml")
    assert "line 2" in info.value.render()
    assert "bad.toml" in info.value.render()


@pytest.mark.parametrize(
    ("value", "expected"),
    [("127.0.0.1:10041", ("127.0.0.1", 10041)), ("[::1]:9", ("::1", 9)), (":80", ("", 80))],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["localhost", "1.2.3.4:99999", "[zz]:1", "::1:80"])
def test_parse_listen_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(value)


def test_duplicate_env_names_rejected() -> None:
    text = """
[[tensorflow.envs]]
name = "a"
python = "/usr/bin/python3"
[[tensorflow.envs]]
name = "a"
python = "/usr/bin/python3"
"""
    with pytest.raises(ConfigError, match="repeated: a"):
        parse_config(text)


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(ROOT / "config" / "tfgpud.toml")]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[http]\nlisten = 10041\nbogus = 1\n[expect]\ngpus = -2\n")
    assert main(["check-config", str(bad)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert str(bad) in err
    assert "line 2: `http.listen`" in err
    assert "unknown key `http.bogus`" in err
    assert "`expect.gpus`" in err
    assert "Traceback" not in err
    syntax = tmp_path / "syntax.toml"
    syntax.write_text("[daemon\n")
    assert main(["check-config", str(syntax)]) == EX_CONFIG
    assert "TOML syntax error" in capsys.readouterr().err
    assert main(["check-config", str(tmp_path / "missing.toml")]) == EX_CONFIG
    assert "cannot read" in capsys.readouterr().err


def test_problems_in_the_nth_array_table_point_at_that_table() -> None:
    text = """[daemon]
interval_seconds = 5

[[tensorflow.envs]]
name = "a"
python = "/a/bin/python"

[[tensorflow.envs]]
name = "b"
python = "/b/bin/python"

[[tensorflow.envs]]
name = "bad name"

[[alerts.webhook]]
url = "http://127.0.0.1:1/"
[[alerts.webhook]]
url = "ftp://nope"
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "x.toml")
    joined = "\n".join(info.value.problems)
    assert "line 13: `tensorflow.envs[2].name`" in joined
    assert "line 12: missing required key `tensorflow.envs[2].python`" in joined
    assert "line 18: `alerts.webhook[1].url`" in joined


def test_a_misspelt_key_names_the_key_meant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tfgpud.toml"
    path.write_text(
        '[daemon]\nstat_dir = "/var/lib/x"\n'
        '[[tensorflow.envs]]\nname = "a"\npython = "/p"\n'
        '[[tensorflow.envs]]\nname = "b"\npyhton = "/p"\n'
        "[memory]\nwhatever_zz = 1\n"
    )
    assert main(["check-config", str(path)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert "line 2: unknown key `daemon.stat_dir` (did you mean `state_dir`?)" in err
    assert "unknown key `tensorflow.envs[1].pyhton` (did you mean `python`?)" in err
    assert "unknown key `memory.whatever_zz`\n" in err + "\n"  # nothing close: no guess


NESTED = "[daemon]\nlog_level = " + "[" * 500 + "]" * 500 + "\n"  # ~1 KB


@pytest.mark.parametrize(
    "text",
    [
        NESTED,
        "[[tensorflow.envs]]\nname = 'a'\npython = 'p'\nenvironment = { x = "
        + "{ y = " * 400
        + "1"
        + " }" * 401
        + "\n",
    ],
)
def test_deeply_nested_values_are_a_config_error_not_a_crash(text: str) -> None:
    assert len(text) < 4096
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_config(text, "nested.toml")


def test_check_config_of_a_nested_or_huge_file_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nested = tmp_path / "nested.toml"
    nested.write_text(NESTED)
    assert main(["check-config", str(nested)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert "nested too deeply" in err and "Traceback" not in err
    huge = tmp_path / "huge.toml"
    huge.write_text("# padding\n" * 200_000)  # 2 MB of comments
    assert main(["check-config", str(huge)]) == EX_CONFIG
    assert "larger than 1024 KiB" in capsys.readouterr().err


@pytest.mark.parametrize(("value", "ok"), [("0", False), ("0.05", False), ("0.1", True)])
def test_interval_seconds_has_a_floor(value: str, ok: bool) -> None:
    text = f"[daemon]\ninterval_seconds = {value}\n"
    if ok:
        assert parse_config(text).daemon.interval_seconds == float(value)
    else:
        with pytest.raises(ConfigError, match=r"line 2: `daemon.interval_seconds`.*0\.1"):
            parse_config(text)


@pytest.mark.parametrize(
    ("header", "why"),
    [
        ('"X-Token" = "abc\\r\\nX-Injected: 1"', "control character"),
        ('"X-Token" = "abc\\n"', "control character"),
        ('"X-Token" = "a\\u0000b"', "control character"),
        ('"Bad Name" = "x"', "not an HTTP token"),
        ('"X-Tab\\r" = "x"', "not an HTTP token"),
    ],
)
def test_webhook_headers_must_be_sendable(header: str, why: str) -> None:
    text = f'[[alerts.webhook]]\nurl = "http://127.0.0.1:1/"\nheaders = {{ {header} }}\n'
    with pytest.raises(ConfigError, match=why) as info:
        parse_config(text, "x.toml")
    assert "line 3: `alerts.webhook[0].headers`" in info.value.render()


def test_ordinary_webhook_headers_are_accepted() -> None:
    text = (
        '[[alerts.webhook]]\nurl = "http://127.0.0.1:1/"\n'
        'headers = { Authorization = "Bearer a.b-c_d=", "X-Scope" = "gpu\\tfleet" }\n'
    )
    assert parse_config(text).alerts.webhook[0].headers["X-Scope"] == "gpu\tfleet"
