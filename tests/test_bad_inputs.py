"""Bad inputs through the CLI: each exits with status 2, names the culprit (field, file or
row), prints no traceback, and leaves nothing a later run would trust.

Config and model-folder mistakes are caught before Ray starts; corpus, model-output and disk
problems surface from inside the pipeline's Ray workers and must arrive the same way.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from fusion.cli import app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory, model_dirs, training_texts) -> Path:
    """The session's tiny Llama target and GPT-2 source, and a six-document corpus."""
    root = tmp_path_factory.mktemp("bad-inputs")
    with (root / "corpus.jsonl").open("w") as stream:
        for text in training_texts[60:66]:
            stream.write(json.dumps({"text": text[:400]}) + "\n")
    shutil.copytree(model_dirs["target"], root / "target")
    shutil.copytree(model_dirs["gpt2"], root / "coder")
    return root


def _raw(world: Path, out: Path) -> dict:
    return {
        "target": {"path": str(world / "target"), "num_cpus": 0.3, "as_teacher": False},
        "sources": [{"name": "coder", "path": str(world / "coder"), "num_cpus": 0.3}],
        "data": {"paths": [str(world / "corpus.jsonl")], "max_length": 48},
        "output": {"dir": str(out), "rows_per_file": 4},
    }


def _trusted(folder: Path) -> dict[str, bytes]:
    """What a later run would take as finished work: manifests, committed parts, exports."""
    if not folder.exists():
        return {}
    kept = {}
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        final = not path.name.startswith(".")
        if (
            path.is_file()
            and final
            and (
                path.name in ("manifest.json", "training_summary.json")
                or path.suffix in (".parquet", ".safetensors")
                or relative.parts[0] == "commits"
            )
        ):
            kept[str(relative)] = path.read_bytes()
    return kept


def _copy_model(world: Path, tmp: Path, name: str) -> Path:
    return shutil.copytree(world / name, tmp / f"broken-{name}")


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _fail(
    command: str,
    raw: dict | str,
    tmp: Path,
    message: str,
    *,
    watch: Path | None = None,
    separate_process: bool = False,
) -> None:
    """Run ``fusion COMMAND`` on the config; check exit 2, the message and trusted output.

    Runs that reach Ray go through a separate ``fusion`` process joined to the test cluster:
    its real stderr is what a user reads (in-process, Ray's log handlers would keep writing
    to the test runner's closed streams).
    """
    config = tmp / "run.yaml"
    config.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, allow_unicode=True))
    watched = watch or Path(raw["output"]["dir"] if isinstance(raw, dict) else tmp / "out")
    before = _trusted(watched)
    if separate_process:
        import ray

        done = subprocess.run(
            [str(Path(sys.executable).with_name("fusion")), command, str(config), "--quiet"],
            capture_output=True,
            text=True,
            env=os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address},
        )
        status, output = done.returncode, done.stdout + done.stderr
    else:
        result = CliRunner().invoke(app, [command, str(config), "--quiet"])
        status, output = result.exit_code, result.output
    assert status == 2, output
    assert re.search(message, output), output
    assert "Traceback" not in output, output
    after = _trusted(watched)
    assert {k: after.get(k) for k in before} == before, "the failed run changed trusted output"
    # The corpus's chunks are cut and committed before any model runs: right whatever a
    # model does later, and what a re-run reuses. Nothing else may be left.
    left = [k for k in after if k not in before and not k.startswith("chunks/")]
    assert not left, f"the failed run left {left}"


# Each case breaks one thing of a good run and names the message that must point at it.
Breakage = Callable[[dict, Path, Path], dict | str]


def _unknown_key(raw, world, tmp):
    raw["align"] = {"topk": 5}
    return raw


def _wrong_type(raw, world, tmp):
    raw["align"] = {"top_k": "ten"}
    return raw


def _lam_out_of_range(raw, world, tmp):
    raw["train"] = {"lam": 1.5}
    return raw


def _duplicate_sources(raw, world, tmp):
    raw["sources"].append(dict(raw["sources"][0]))
    return raw


def _malformed_yaml(raw, world, tmp):
    return "target: {path: [unclosed\n"


def _missing_model(raw, world, tmp):
    raw["sources"][0]["path"] = str(tmp / "nowhere")
    return raw


def _hub_id(raw, world, tmp):
    raw["sources"][0]["path"] = "some-org/some-model"
    return raw


def _no_weights(raw, world, tmp):
    folder = _copy_model(world, tmp, "coder")
    (folder / "model.safetensors").unlink()
    raw["sources"][0]["path"] = str(folder)
    return raw


def _pickle_only(raw, world, tmp):
    folder = _copy_model(world, tmp, "coder")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    raw["sources"][0]["path"] = str(folder)
    return raw


def _remote_code(raw, world, tmp):
    folder = _copy_model(world, tmp, "coder")
    _edit_json(folder / "config.json", auto_map={"AutoModelForCausalLM": "modeling_x.XLM"})
    raw["sources"][0]["path"] = str(folder)
    return raw


def _no_offsets(raw, world, tmp):
    from transformers import ByT5Tokenizer

    folder = _copy_model(world, tmp, "coder")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    ByT5Tokenizer().save_pretrained(folder)
    raw["sources"][0]["path"] = str(folder)
    return raw


def _vocab_too_small(raw, world, tmp):
    folder = _copy_model(world, tmp, "target")
    _edit_json(folder / "config.json", vocab_size=500)
    raw["target"]["path"] = str(folder)
    return raw


def _chunk_longer_than_context(raw, world, tmp):
    raw["data"]["max_length"] = 4096
    return raw


def _no_corpus_file(raw, world, tmp):
    raw["data"]["paths"] = [str(tmp / "missing" / "*.jsonl")]
    return raw


def _truncated_parquet_corpus(raw, world, tmp):
    pq.write_table(pa.table({"text": ["some text"] * 50}), tmp / "corpus.parquet")
    data = (tmp / "corpus.parquet").read_bytes()
    (tmp / "corpus.parquet").write_bytes(data[: len(data) // 2])
    raw["data"]["paths"] = [str(tmp / "corpus.parquet")]
    return raw


def _output_of_another_run(raw, world, tmp):
    out = Path(raw["output"]["dir"])
    out.mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"fingerprint": "0123456789abcdef"}))
    (out / "manifest.json").write_text(json.dumps({"status": "complete", "rows": 1}))
    return raw


def _output_not_a_run(raw, world, tmp):
    out = Path(raw["output"]["dir"])
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("my own files")
    return raw


PREPARE_CASES: dict[str, tuple[Breakage, str]] = {
    "unknown config key": (_unknown_key, r"align\.topk: unknown key"),
    "wrong type": (_wrong_type, r"align\.top_k: .*integer.*\(got 'ten'\)"),
    "lambda outside [0, 1]": (_lam_out_of_range, r"train\.lam: λ is a number between 0 and 1"),
    "duplicate source names": (_duplicate_sources, r"sources\.1\.name: 'coder' is already"),
    "malformed YAML": (_malformed_yaml, r"run\.yaml.*not valid YAML"),
    "missing model path": (_missing_model, r"sources\.0\.path .*nowhere.* does not exist"),
    "hub id instead of a folder": (_hub_id, r"'some-org/some-model'.*looks like a hub id"),
    "model folder without weights": (_no_weights, r"sources\.0\.path .* holds no weights"),
    "pickle-only weights": (_pickle_only, r"sources\.0\.path .*only pickle weights.*allow_pickle"),
    "remote code not allowed": (_remote_code, r"sources\.0\.trust_remote_code: true only if"),
    "tokenizer without offsets": (_no_offsets, r"sources\.0\.path .*without character offsets"),
    "vocab_size below len(tokenizer)": (
        _vocab_too_small,
        r"target\.path .*tokenizer has \d+ tokens but config\.json says vocab_size 500",
    ),
    "chunk longer than the context": (
        _chunk_longer_than_context,
        r"data\.max_length is 4096 tokens but target reads at most 1024",
    ),
    "corpus path matching nothing": (_no_corpus_file, r"data\.paths entry .* matches no file"),
    "truncated Parquet corpus": (
        _truncated_parquet_corpus,
        r"corpus\.parquet: not a readable Parquet file",
    ),
    "output dir holding another run": (
        _output_of_another_run,
        r"output\.dir .* holds a run without stored units",
    ),
    "output dir holding other files": (_output_not_a_run, r"output\.dir .* holds no fusion run"),
}


@pytest.mark.parametrize("case", PREPARE_CASES)
def test_bad_input_is_refused_before_any_work(world, tmp_path, case):
    breakage, message = PREPARE_CASES[case]
    raw = breakage(_raw(world, tmp_path / "out"), world, tmp_path)
    _fail("prepare", raw, tmp_path, message)


# Problems that only the pipeline's Ray workers can see: the documents and the models' output.
def _empty_corpus(raw, world, tmp):
    (tmp / "empty.jsonl").write_text("")
    raw["data"]["paths"] = [str(tmp / "empty.jsonl")]
    return raw


def _empty_documents(raw, world, tmp):
    (tmp / "blank.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    raw["data"]["paths"] = [str(tmp / "blank.jsonl")]
    return raw


def _invalid_utf8(raw, world, tmp):
    (tmp / "bad.jsonl").write_bytes(b'{"text": "fine text here"}\n{"text": "\xff\xfe"}\n')
    raw["data"]["paths"] = [str(tmp / "bad.jsonl")]
    return raw


def _duplicate_ids(raw, world, tmp):
    lines = [{"text": "first text", "id": "doc-1"}, {"text": "other text", "id": "doc-1"}]
    (tmp / "big.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    raw["data"] |= {"paths": [str(tmp / "big.jsonl")], "id_field": "id"}
    return raw


def _nan_logits(raw, world, tmp):
    import torch
    from transformers import AutoModelForCausalLM

    folder = _copy_model(world, tmp, "coder")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    raw["sources"][0]["path"] = str(folder)
    return raw


PIPELINE_CASES: dict[str, tuple[Breakage, str]] = {
    "empty corpus": (_empty_corpus, r"yield no chunk of two or more target tokens"),
    "only empty documents": (_empty_documents, r"yield no chunk of two or more target tokens"),
    "invalid UTF-8": (_invalid_utf8, r"bad\.jsonl: not valid UTF-8 at byte"),
    "duplicate ids": (
        _duplicate_ids,
        r"big\.jsonl: two documents have the data\.id_field 'id' 'doc-1'; ids must be unique",
    ),
    "NaN logits from a source": (
        _nan_logits,
        r"source 'coder' produced NaN or infinite logits for row '.*corpus\.jsonl#\d+:\d+'",
    ),
}


@pytest.mark.parametrize("case", PIPELINE_CASES)
def test_bad_input_found_by_a_worker_stops_the_run_cleanly(world, ray_cluster, tmp_path, case):
    breakage, message = PIPELINE_CASES[case]
    raw = breakage(_raw(world, tmp_path / "out"), world, tmp_path)
    _fail("prepare", raw, tmp_path, message, separate_process=True)
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 8 KiB tmpfs: room for the run's records, not for a part (needs mount rights)."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_disk_full_while_writing_names_the_file_and_leaves_no_part(
    world, ray_cluster, tmp_path, tiny_filesystem
):
    raw = _raw(world, tiny_filesystem / "out")
    message = r"could not write .*/out/chunks/data/part-.*No space left on device"
    _fail("prepare", raw, tmp_path, message, separate_process=True)
    leftovers = list((tiny_filesystem / "out" / "chunks" / "data").iterdir())
    assert leftovers == [], f"a failed write left {leftovers}"


# Training: the prepared data set must belong to this target, be whole and be big enough.
# The session's prepared world (a target, one source "src" and their teacher data) is copied.
def _train_raw(raw: dict, data: Path, storage: Path) -> dict:
    settings = {
        "data": str(data),
        "storage_path": str(storage),
        "strategy": "ddp",
        "cpus_per_worker": 0.5,
        "global_batch_size": 2,
        "micro_batch_size": 2,
        "max_steps": 1,
    }
    return copy.deepcopy(raw) | {"output": {"dir": str(data)}, "train": settings}


def _other_target(raw, data):
    raw["target"]["path"] = raw["sources"][0]["path"]
    return r"prepared for another target tokenizer"


def _truncated_part(raw, data):
    part = sorted((data / "data").glob("*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:-100])
    return rf"{part.name} has [\d,]+ bytes but the manifest says"


def _corrupted_part(raw, data):
    part = sorted((data / "data").glob("*.parquet"))[-1]
    content = bytearray(part.read_bytes())
    content[len(content) // 2] ^= 0xFF
    part.write_bytes(bytes(content))
    return rf"{part.name}: its SHA-256 differs from the manifest's"


def _unfinished_data(raw, data):
    (data / "manifest.json").unlink()
    return r"holds no complete prepared data set \(no manifest\.json\)"


def _unknown_teacher(raw, data):
    raw["train"]["teacher"] = "writer"
    return r"lacks columns .*writer\.topk_ids.*train\.teacher must be one of"


def _batch_bigger_than_data(raw, data):
    raw["train"] |= {"global_batch_size": 4096, "micro_batch_size": 4096}
    return r"fewer than one global batch of 4096: lower train\.global_batch_size"


def _storage_of_an_earlier_run(raw, data):
    storage = Path(raw["train"]["storage_path"])
    (storage / "fusion-train").mkdir(parents=True)
    raw["train"]["resume"] = "never"
    return r"holds an earlier run and train\.resume is 'never'"


TRAIN_CASES: dict[str, Callable[[dict, Path], str]] = {
    "target tokenizer mismatch": _other_target,
    "truncated teacher part": _truncated_part,
    "corrupted teacher part": _corrupted_part,
    "data set without manifest": _unfinished_data,
    "teacher missing from the data": _unknown_teacher,
    "global batch bigger than the data": _batch_bigger_than_data,
    "storage of an earlier run": _storage_of_an_earlier_run,
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_training_refuses_data_it_cannot_trust(prepared_world, tmp_path, case):
    root, prepared_raw = prepared_world
    data = shutil.copytree(root / "data", tmp_path / "data")
    raw = _train_raw(prepared_raw, data, tmp_path / "storage")
    message = TRAIN_CASES[case](raw, data)
    _fail("train", raw, tmp_path, message, watch=tmp_path / "storage")
    assert not (tmp_path / "storage" / "export").exists()
