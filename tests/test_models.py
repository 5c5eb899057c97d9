"""Model folders: safe loading, and an error naming the culprit for every unusable folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fusion.cli import app
from fusion.config import ModelConfig
from fusion.models.loading import (
    ModelFolderError,
    check_model_folder,
    load_causal_lm,
    resolve_device,
)


def test_a_saved_tiny_model_loads_from_its_folder(model_dirs):
    model = load_causal_lm(ModelConfig(path=str(model_dirs["gpt2"])), "sources.0", "cpu")
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[:2] == (1, 3) and torch.isfinite(logits).all()


def _copy(model_dirs, tmp_path, name="gpt2"):
    return shutil.copytree(model_dirs[name], tmp_path / name)


def test_missing_folder_and_hub_ids_are_refused_at_once(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        check_model_folder(ModelConfig(path=str(tmp_path / "missing")), "target")
    with pytest.raises(ModelFolderError, match="looks like a hub id: fusion never downloads"):
        check_model_folder(ModelConfig(path="mistralai/Mistral-7B-v0.1"), "sources.0")
    with pytest.raises(ModelFolderError, match="is a URI"):
        check_model_folder(ModelConfig(path="s3://bucket/model"), "sources.0")


def test_folder_without_weights_is_refused(model_dirs, tmp_path):
    folder = _copy(model_dirs, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"sources.1.path .* holds no weights"):
        check_model_folder(ModelConfig(path=str(folder)), "sources.1")


def test_pickle_only_weights_need_opt_in(model_dirs, tmp_path):
    folder = _copy(model_dirs, tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match=r"only pickle weights .*allow_pickle: true"):
        check_model_folder(ModelConfig(path=str(folder)), "sources.0")
    check_model_folder(ModelConfig(path=str(folder), allow_pickle=True), "sources.0")


def test_remote_code_needs_opt_in(model_dirs, tmp_path):
    folder = _copy(model_dirs, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomLM"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="trust_remote_code: true only if you trust"):
        check_model_folder(ModelConfig(path=str(folder)), "target")


def test_slow_tokenizer_without_offsets_is_refused(model_dirs, tmp_path):
    from transformers import ByT5Tokenizer

    folder = _copy(model_dirs, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    ByT5Tokenizer().save_pretrained(folder)  # a Python tokenizer: no character offsets
    with pytest.raises(ModelFolderError, match="slow tokenizer without character offsets"):
        check_model_folder(ModelConfig(path=str(folder)), "sources.0")


def test_gpu_request_without_a_gpu_fails_fast():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelFolderError, match="configured for a GPU but this worker sees none"):
        resolve_device(ModelConfig(path="m", device="cuda"), 0)
    assert resolve_device(ModelConfig(path="m"), 0) == "cpu"


def test_validate_command_accepts_a_good_config_and_names_a_bad_folder(model_dirs, tmp_path):
    raw = {
        "target": {"path": str(model_dirs["target"])},
        "sources": [{"name": "coder", "path": str(model_dirs["gpt2"])}],
        "data": {"paths": ["corpus.jsonl"], "max_length": 1024},  # the tiny models' context
        "output": {"dir": "out"},
    }
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "ok.yaml")])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "coder" in result.output
    raw["sources"][0]["path"] = str(tmp_path / "gone")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2
    assert "sources.0.path" in result.output and "does not exist" in result.output
    assert "Traceback" not in result.output


def test_validate_lists_every_problem_of_every_model_folder(model_dirs, tmp_path):
    (tmp_path / "empty").mkdir()
    raw = {
        "target": {"path": str(model_dirs["target"])},
        "sources": [
            {"name": "gone", "path": str(tmp_path / "gone")},
            {"name": "coder", "path": str(model_dirs["gpt2"])},
            {"name": "hollow", "path": str(tmp_path / "empty")},
        ],
        "data": {"paths": ["corpus.jsonl"], "max_length": 4096},  # beyond the target's 1024
        "output": {"dir": "out"},
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines[0] == "error: 3 problems with the models:"
    assert "data.max_length is 4096 tokens but target reads at most 1024" in lines[1]
    assert "sources.0.path" in lines[2] and "does not exist" in lines[2]
    assert "sources.2.path" in lines[3] and "neither config.json nor a .gguf file" in lines[3]
