"""The `fusion` command line: help, the demo, and clear errors for bad paths."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from fusion.cli import app

runner = CliRunner()


def test_help_lists_every_command_with_its_help_text():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "demo" in result.output and "Run the embedded demo" in result.output
    assert "align" in result.output and "Align two tokenizations" in result.output


def test_quick_demo_writes_a_complete_finite_summary(tmp_path):
    result = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["spans"] > 0 and summary["target_tokens"] > 0
    assert all(math.isfinite(value) for value in summary.values())
    assert 0.5 < summary["dtw_one_to_one_fraction"] <= 1.0
    assert (tmp_path / "tokenizers" / "target" / "tokenizer.json").is_file()


def test_align_prints_the_pairs_of_two_saved_tokenizers(
    tmp_path, byte_level_tokenizer, metaspace_tokenizer
):
    byte_level_tokenizer.save_pretrained(tmp_path / "source")
    metaspace_tokenizer.save_pretrained(tmp_path / "target")
    (tmp_path / "text.txt").write_text("def f(x):\n    return x + 1\n", encoding="utf-8")
    for method in ("dtw", "offsets"):
        result = runner.invoke(
            app,
            [
                "align",
                str(tmp_path / "source"),
                str(tmp_path / "target"),
                str(tmp_path / "text.txt"),
                "--method",
                method,
            ],
        )
        assert result.exit_code == 0, result.output
        assert "of target positions have exactly one source token" in result.output


def test_align_with_a_missing_tokenizer_folder_names_it_and_exits_non_zero(tmp_path):
    (tmp_path / "text.txt").write_text("hello", encoding="utf-8")
    missing = tmp_path / "no-such-tokenizer"
    result = runner.invoke(app, ["align", str(missing), str(missing), str(tmp_path / "text.txt")])
    assert result.exit_code == 2
    assert "no-such-tokenizer" in result.output and "does not exist" in result.output


def test_align_with_a_folder_without_tokenizer_files_says_what_is_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.txt").write_text("hello", encoding="utf-8")
    empty = str(tmp_path / "empty")
    result = runner.invoke(app, ["align", empty, empty, str(tmp_path / "text.txt")])
    assert result.exit_code == 2
    assert "holds no tokenizer" in result.output
