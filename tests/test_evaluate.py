"""`fusion eval`: bits per byte and perplexity as the model's own loss defines them."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from typer.testing import CliRunner

from fusion.cli import app
from fusion.evaluate.bpb import evaluate
from fusion.models.scoring import score

runner = CliRunner()
TEXTS = ["def f(x):\n    return x + 1\n", "The quick brown fox jumps over the lazy dog."]


def test_bits_per_byte_is_the_models_own_loss_over_the_bytes(model_dirs):
    from transformers import AutoModelForCausalLM

    from fusion.models.loading import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dirs["target"]).eval()
    tokenizer = load_tokenizer(model_dirs["target"])
    nll, tokens = 0.0, 0
    for text in TEXTS:
        ids = torch.tensor(
            [[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]]
        )
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        nll += loss * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    result = score([model], tokenizer, TEXTS, max_length=64, batch_size=2)
    size = sum(len(t.encode()) for t in TEXTS)
    assert result.tokens == tokens and result.bytes == size
    assert math.isclose(result.bpb, nll / math.log(2) / size, rel_tol=1e-4)
    assert math.isclose(result.perplexity, math.exp(nll / tokens), rel_tol=1e-4)


def test_an_ensemble_of_one_model_twice_scores_as_the_model(model_dirs, tmp_path):
    corpus = tmp_path / "held.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    target = str(model_dirs["target"])
    results = evaluate({"one": [target], "twice": [target, target]}, {"mixed": str(corpus)})
    assert math.isclose(results["one"]["avg_bpb"], results["twice"]["avg_bpb"], rel_tol=1e-5)


def test_eval_cli_prints_a_table_and_writes_json(model_dirs, tmp_path):
    corpus = tmp_path / "held.txt"
    corpus.write_text(TEXTS[1], encoding="utf-8")
    out = tmp_path / "results.json"
    result = runner.invoke(
        app,
        [
            "eval",
            "-m",
            f"t={model_dirs['target']}",
            "-m",
            f"g={model_dirs['gpt2']}",
            "-d",
            f"prose={corpus}",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert set(saved) == {"t", "g"} and saved["t"]["bpb"]["prose"] > 0
    for name in ("t", "g"):  # a progress line per model ends at all of its tokens
        assert re.search(
            rf"^{name}: ([\d,]+)/\1 tokens · [\d,]+ tok/s · 100% · 0s left$", result.output, re.M
        ), result.output
    quiet = runner.invoke(
        app, ["eval", "-m", f"t={model_dirs['target']}", "-d", f"prose={corpus}", "--quiet"]
    )
    assert quiet.exit_code == 0 and "tok/s" not in quiet.output, quiet.output
    per_document = runner.invoke(
        app,
        ["eval", "-m", f"t={model_dirs['target']}", "-d", f"prose={corpus}", "-q", "--documents"],
    )
    assert per_document.exit_code == 2 and "give --output too" in per_document.output
    args = ["eval", "-m", f"t={model_dirs['target']}", "-d", f"prose={corpus}", "-q", "-o"]
    assert runner.invoke(app, [*args, str(out), "--documents"]).exit_code == 0
    documents = json.loads(out.read_text())["t"]["documents"]["prose"]
    assert documents["bytes"] == [len(TEXTS[1].encode())]
    bpb = documents["nll"][0] / math.log(2) / documents["bytes"][0]
    assert bpb == pytest.approx(saved["t"]["bpb"]["prose"], abs=1e-5)  # reported to 5 places


def test_eval_refuses_an_ensemble_of_different_vocabularies(model_dirs, tmp_path):
    corpus = tmp_path / "held.txt"
    corpus.write_text(TEXTS[0], encoding="utf-8")
    result = runner.invoke(
        app,
        ["eval", "-m", f"mix={model_dirs['target']}+{model_dirs['gpt2']}", "-d", f"c={corpus}"],
    )
    assert result.exit_code == 2
    assert "mix" in result.output and "share one vocabulary" in result.output


def test_eval_names_a_malformed_option(tmp_path):
    result = runner.invoke(app, ["eval", "-m", "no-equals-sign", "-d", f"c={tmp_path}"])
    assert result.exit_code == 2 and "expected NAME=PATH" in result.output


def test_eval_names_the_model_option_of_a_folder_it_cannot_load(tmp_path):
    corpus = tmp_path / "held.txt"
    corpus.write_text(TEXTS[0], encoding="utf-8")
    (tmp_path / "empty").mkdir()
    for folder, problem in (
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "empty", "has neither config.json nor a .gguf file"),
    ):
        result = runner.invoke(app, ["eval", "-m", f"base={folder}", "-d", f"c={corpus}"])
        assert result.exit_code == 2
        assert f"--model base '{folder}' {problem}" in " ".join(result.output.split())


def test_eval_refuses_an_unknown_dtype_or_device_in_one_line(tmp_path):
    for option, value, expected in (
        ("--dtype", "bf16", "--dtype 'bf16': expected one of auto, float32, bfloat16, float16"),
        ("--device", "gpu", "--device 'gpu': expected cpu or cuda"),
    ):
        result = runner.invoke(
            app, ["eval", "-m", f"m={tmp_path}", "-d", f"c={tmp_path}", option, value]
        )
        assert result.exit_code == 2
        assert result.output.strip() == f"error: {expected}"


def test_each_documents_nll_is_the_sum_over_its_own_windows(model_dirs):
    """Per document (what a paired bootstrap resamples): the NLL of its windows of 8 tokens,
    each read after BOS, computed here window by window with the model's own loss."""
    from transformers import AutoModelForCausalLM

    from fusion.models.loading import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dirs["target"]).eval()
    tokenizer = load_tokenizer(model_dirs["target"])
    expected = []
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        total = 0.0
        for start in range(0, len(ids), 7):
            window = torch.tensor([[tokenizer.bos_token_id, *ids[start : start + 7]]])
            with torch.no_grad():
                total += model(input_ids=window, labels=window).loss.item() * (window.shape[1] - 1)
        expected.append(total)
    assert len(tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"]) > 7  # several windows
    result = score([model], tokenizer, TEXTS, max_length=8, batch_size=3)
    assert result.document_bytes == tuple(len(t.encode()) for t in TEXTS)
    for got, want in zip(result.document_nll, expected, strict=True):
        assert math.isclose(got, want, rel_tol=1e-4)
    assert math.isclose(result.nll, sum(expected), rel_tol=1e-4)
