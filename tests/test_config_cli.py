"""Typed configuration (every problem reported at once) and the command line's contract: one
`Error: ...` line on stderr, no traceback, a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kdpipe.pipeline.config import build_config
from kdpipe.pipeline.errors import ConfigError
from kdpipe.stages.teacher_dump import DumpConfig

REQUIRED = {"teacher": "t", "data": ["c.txt"], "out": "cache"}


def write(tmp: Path, obj, name: str = "cfg.yaml") -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(obj) if name.endswith(".yaml") else json.dumps(obj))
    return p


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    cfg = write(tmp_path, {**REQUIRED, "top_k": "many", "seq_len": 4, "temperaturez": [1, 2],
                           "colour": "red", "mask_prob": 1.5, "packing": "zip"})
    with pytest.raises(ConfigError) as e:
        build_config(DumpConfig, cfg, {})
    msg = str(e.value)
    assert msg.startswith("invalid configuration (6 problems): ")
    for needle in ("top_k: ", "seq_len: ", "temperaturez: unknown key", "colour: unknown key",
                   "mask_prob: ", "packing: "):
        assert needle in msg, needle
    assert "\n" not in msg


def test_flags_override_the_file_and_none_means_not_given(tmp_path: Path) -> None:
    cfg = write(tmp_path, {**REQUIRED, "top_k": 4, "seed": 9}, "cfg.json")
    c = build_config(DumpConfig, cfg, {"top_k": 6, "seed": None})
    assert (c.top_k, c.seed, c.seq_len) == (6, 9, 128)
    with pytest.raises(ValidationError):
        c.top_k = 3  # frozen


def test_temperatures_are_checked_and_sorted() -> None:
    assert build_config(DumpConfig, None, {**REQUIRED, "temperatures": [4, 1, 2]}).temperatures == [1, 2, 4]
    with pytest.raises(ConfigError, match="temperatures must be positive"):
        build_config(DumpConfig, None, {**REQUIRED, "temperatures": [1, 0]})
    with pytest.raises(ConfigError, match="temperatures must be distinct"):
        build_config(DumpConfig, None, {**REQUIRED, "temperatures": [2, 2]})
    with pytest.raises(ConfigError, match="must not exceed 1"):
        build_config(DumpConfig, None, {**REQUIRED, "mask_token_prob": 0.8, "random_token_prob": 0.3})


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"),
    ("- a\n- b\n", "must hold a mapping"),
    ("top_k: [1\n", "not valid YAML/JSON"),
])
def test_unusable_config_file(tmp_path: Path, content, needle: str) -> None:
    p = tmp_path / "cfg.yaml"
    if content is not None:
        p.write_text(content)
    with pytest.raises(ConfigError, match=needle):
        build_config(DumpConfig, p, {})


def test_missing_required_keys_are_listed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        build_config(DumpConfig, None, {"top_k": 8})
    for key in ("teacher", "data", "out"):
        assert f"{key}: Field required" in str(e.value)


# -------------------------------------------------------------------------------- the CLI

def test_config_errors_through_a_real_process(tmp_path: Path, kdpipe_cli, one_line_error) -> None:
    cfg = write(tmp_path, {**REQUIRED, "out": str(tmp_path / "cache"), "top_k": "many", "seq_len": 4,
                           "colour": "red"})
    proc = kdpipe_cli("teacher-dump", "--config", cfg, check=False)
    one_line_error(proc, "3 problems", "top_k", "seq_len", "colour: unknown key")
    assert not (tmp_path / "cache").exists()


def test_file_and_flags_together(tmp_path: Path, kdpipe_inproc, teacher_dir, small_corpus_file) -> None:
    cfg = write(tmp_path, {"teacher": str(teacher_dir), "data": [str(small_corpus_file)],
                           "out": str(tmp_path / "cache"), "seq_len": 32, "top_k": 4, "hidden_dim": 8})
    proc = kdpipe_inproc("teacher-dump", "--config", cfg, "--top-k", "6", "--shard-size", "100")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert (m["top_k"], m["seq_len"], m["hidden_dim"], len(m["shards"])) == (6, 32, 8, 1)
    run_info = json.loads((tmp_path / "cache" / "run_info.json").read_text())
    assert run_info["config"]["top_k"] == 6 and run_info["code_revision"]


@pytest.mark.parametrize("args, needle", [
    (("--top-k", "abc"), "'--top-k'"),
    (("--temperatures", "1,x"), "comma-separated numbers"),
    (("--packing", "zip"), "'--packing'"),
    (("--no-such-flag",), "No such option"),
])
def test_bad_flags(args, needle: str, kdpipe_inproc, one_line_error) -> None:
    proc = kdpipe_inproc("teacher-dump", "--teacher", "t", "--data", "c.txt", "--out", "o", *args)
    assert proc.returncode == 2
    one_line_error(proc, needle)


def test_flag_values_checked_by_the_config(kdpipe_inproc, one_line_error, tmp_path: Path) -> None:
    proc = kdpipe_inproc("teacher-dump", "--teacher", "t", "--data", "c.txt", "--out", tmp_path / "o",
                         "--top-k", "0", "--seq-len", "3", "--temperatures", "1,-2")
    one_line_error(proc, "3 problems", "top_k", "seq_len", "temperatures must be positive")


def test_help_and_version(kdpipe_inproc) -> None:
    top = kdpipe_inproc("--help")
    assert top.returncode == 0 and "teacher-dump" in top.stdout and "cache" in top.stdout
    sub = kdpipe_inproc("teacher-dump", "--help")
    assert sub.returncode == 0 and "Example: kdpipe teacher-dump" in sub.stdout and "--top-k" in sub.stdout
    assert "verify" in kdpipe_inproc("cache", "--help").stdout
    assert kdpipe_inproc("--version").stdout.startswith("kdpipe, version ")


@pytest.mark.parametrize("sub", ["verify", "info"])
def test_cache_commands_on_a_non_cache(sub: str, tmp_path: Path, kdpipe_inproc, one_line_error) -> None:
    one_line_error(kdpipe_inproc("cache", sub, tmp_path / "nothing"), "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(kdpipe_inproc("cache", sub, tmp_path / "empty"), "not a finished kdpipe cache")
