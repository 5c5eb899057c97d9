"""The `fusion` command line: help and clear errors for bad paths."""

from __future__ import annotations

from typer.testing import CliRunner

from fusion.cli import app

runner = CliRunner()


def test_help_lists_every_command_with_its_help_text():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "demo" in result.output and "Run a real fusion experiment" in result.output
    assert "eval" in result.output and "Bits per byte" in result.output
    assert "align" in result.output and "Align two tokenizations" in result.output


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
