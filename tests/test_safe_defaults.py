"""Safe defaults: the hub stays off in every worker, and files are written whole or not at all."""

from __future__ import annotations

import pytest

from fusion.cluster import runtime_env
from fusion.config import parse_config
from fusion.data.files import write_text_atomically


def _config(**ray) -> object:
    raw = {
        "target": {"path": "t"},
        "sources": [{"name": "s", "path": "p"}],
        "data": {"paths": ["c.jsonl"]},
        "output": {"dir": "o"},
    }
    return parse_config(raw | {"ray": ray})


def test_workers_run_with_the_hub_switched_off():
    assert runtime_env(_config())["env_vars"] == {"HF_HUB_OFFLINE": "1"}


def test_a_configured_runtime_env_keeps_its_settings_and_may_turn_the_hub_on():
    env = runtime_env(
        _config(runtime_env={"pip": ["x"], "env_vars": {"A": "1", "HF_HUB_OFFLINE": "0"}})
    )
    assert env == {"pip": ["x"], "env_vars": {"HF_HUB_OFFLINE": "0", "A": "1"}}


def test_an_atomic_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    write_text_atomically(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomically(target, "half \ud800 written")  # cannot be encoded: fails mid-way
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
