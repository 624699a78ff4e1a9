"""pipelines.toml: parsed once, frozen, every error naming file, pipeline, stage and key."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cuepipe.orchestrator.pipeline import ConfigError, apply_overrides, describe, load_file, missing_resources, parse
from tests.support.env import ROOT, subprocess_env

GOOD = """
version = 1
[defaults]
timeout = 50
out = "renders"
report = ["127.0.0.1:7000"]
[pipelines.p]
description = "d"
report = ["localhost:7001"]
[[pipelines.p.stages]]
stage = "misbehaving"
retries = 2
params = { frames = 7, mode = "slow" }
[[pipelines.p.stages]]
stage = "misbehaving"
timeout = 5
stall_timeout = 0
"""


def parsed(text: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    return parse(text, tmp_path / "pipelines.toml")


def test_good_file(tmp_path: Path) -> None:
    f = parsed(GOOD, tmp_path)
    p = f.pipelines["p"]
    assert p.out == (tmp_path / "renders").resolve()  # relative to the file, not the cwd
    assert p.report == (("127.0.0.1", 7000), ("localhost", 7001))
    first, second = p.stages
    assert (first.timeout, first.retries, dict(first.params)) == (50.0, 2, {"frames": 7, "mode": "slow"})
    assert (second.timeout, second.retries, second.stall_timeout) == (5.0, 0, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.timeout = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        first.params["frames"] = 1  # type: ignore[index]


def test_shipped_file_is_valid() -> None:
    f = load_file(ROOT / "pipelines.toml")
    assert "prep" in f.pipelines
    assert [s.name for s in f.pipelines["prep"].stages] == ["preprocess"]


@pytest.mark.parametrize(("text", "expected"), [
    ("version = 1\n[pipelines.a\n", "pipelines.toml: invalid TOML"),
    ("version = 2\n[pipelines.a]\n", "key 'version': unsupported version 2"),
    ("version = 1\n", "no pipelines declared"),
    ("[pipelines.a]\nstages = [{stage = 'nope'}]\n",
     "pipeline 'a', stage 0, key 'stage': unknown stage 'nope' (known: preprocess"),
    ("[pipelines.a]\nstages = [{stage = 'misbehaving', params = {speed = 1}}]\n",
     "pipeline 'a', stage 0 'misbehaving', key 'speed': unknown parameter (stage 'misbehaving' takes: frames,"),
    ("[pipelines.a]\nstages = [{stage = 'misbehaving', params = {frames = 'x'}}]\n",
     "stage 0 'misbehaving', key 'frames': expected an integer, got 'x'"),
    ("[pipelines.a]\nstages = [{stage = 'misbehaving', params = {frames = 0}}]\n", "key 'frames': must be >= 1"),
    ("[pipelines.a]\nstages = [{stage = 'misbehaving', params = {mode = 'dance'}}]\n",
     "key 'mode': expected one of ok, exit3"),
    ("[pipelines.a]\nstages = [{stage = 'misbehaving', timeout = -1}]\n", "key 'timeout': timeout must be"),
    ("[pipelines.a]\nstages = [{stage = 'misbehaving', retries = 1.5}]\n", "key 'retries': retries must be"),
    ("[pipelines.a]\nstages = [{stage = 'misbehaving', colour = 1}]\n", "key 'colour': unknown key"),
    ("[pipelines.a]\nstages = []\n", "pipeline 'a', key 'stages': needs at least one"),
    ("[pipelines.a]\nreport = ['nohost']\nstages = [{stage = 'misbehaving'}]\n", "key 'report': expected HOST:PORT"),
    ("[defaults]\nwho = 1\n[pipelines.a]\nstages = [{stage = 'misbehaving'}]\n", "key 'who': unknown key in"),
])
def test_errors_name_the_place(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parsed(text, tmp_path)
    assert expected in str(info.value)
    assert str(info.value).startswith(str(tmp_path / "pipelines.toml"))


def test_overrides(tmp_path: Path) -> None:
    f = parsed(GOOD, tmp_path)
    p = apply_overrides(f, f.pipelines["p"], ["0.frames=3", "misbehaving.mode=ok"])
    assert [dict(s.params) for s in p.stages] == [{"frames": 3, "mode": "ok"}, {"mode": "ok"}]
    assert dict(f.pipelines["p"].stages[0].params)["frames"] == 7, "the parsed file must not change"
    for bad, message in [("frames=3", "expected STAGE.KEY=VALUE"), ("9.frames=3", "no stage '9'"),
                         ("misbehaving.frames=lots", "expected an integer"), ("0.nope=1", "unknown parameter")]:
        with pytest.raises(ConfigError, match=message):
            apply_overrides(f, f.pipelines["p"], [bad])


def test_missing_model_is_reported(tmp_path: Path) -> None:
    text = "[pipelines.a]\nstages = [{stage = 'misbehaving', params = {model = 'not_a_model'}}]\n"
    problems = missing_resources(parsed(text, tmp_path).pipelines["a"])
    assert len(problems) == 1
    assert "pipeline 'a', stage 0 'misbehaving', key 'model': missing model" in problems[0]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cuepipe.orchestrator.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env=subprocess_env())


def test_pipelines_json_and_check(tmp_path: Path) -> None:
    (tmp_path / "pipelines.toml").write_text(GOOD)
    listed = run_cli("pipelines", "--json", cwd=tmp_path)  # ./pipelines.toml is found from the cwd
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert data == describe(load_file(tmp_path / "pipelines.toml"))
    assert [s["stage"] for s in data["pipelines"][0]["stages"]] == ["misbehaving", "misbehaving"]
    check = run_cli("check", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "1 pipeline(s), 0 problem(s)" in check.stdout
    (tmp_path / "pipelines.toml").write_text(GOOD.replace('mode = "slow"', 'mode = "slow", model = "nope"'))
    check = run_cli("check", cwd=tmp_path)
    assert check.returncode == 1 and "missing model" in check.stderr
    (tmp_path / "pipelines.toml").write_text("[pipelines.a]\nstages = 3\n")
    check = run_cli("check", cwd=tmp_path)
    assert check.returncode == 2 and "key 'stages'" in check.stderr
