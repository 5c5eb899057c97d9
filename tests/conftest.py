"""Shared fixtures: the golden vectors and small tokenizers trained once per session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import settings

from fusion.testing.toy import train_tokenizer

# Property tests draw the same examples on every run (CI): a failure here is a failure
# everywhere. HYPOTHESIS_PROFILE=thorough draws new random examples on every run, ten times
# as many (tests.strategies.examples), to find what the fixed ones never reach.
settings.register_profile("deterministic", derandomize=True, deadline=None, print_blob=True)
settings.register_profile(
    "thorough", derandomize=False, deadline=None, print_blob=True, max_examples=1000
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

# Every training worker a test starts holds itself to the GPU rule (collectives only on the
# engine's device, see fusion.models.device), so a CPU run fails where NCCL would.
os.environ["FUSION_STRICT_DEVICE"] = "1"

# Ray Train's controller looks at its workers every 2 s by default, so every run ends up to
# 2 s after its workers are done and starts as late; a tiny training run spends about a
# quarter of its time there. Polled every 0.2 s (inherited by every Ray process and `fusion`
# subprocess a test starts), a three-step run takes 11 s instead of 15.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

# A copy of shared/golden/fusellm_public.json travels with the repository, so a clone with
# nothing beside it runs every test; FUSION_GOLDEN points at another copy to check against.
DATA = Path(__file__).resolve().parent / "data"
GOLDEN = Path(os.environ.get("FUSION_GOLDEN", DATA / "fusellm_public.json"))


@pytest.fixture(scope="session")
def golden() -> dict:
    if not GOLDEN.is_file():
        pytest.fail(
            f"golden vectors not found at {GOLDEN}; restore tests/data/ or set FUSION_GOLDEN"
        )
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def training_texts() -> list[str]:
    import pydoc_data.topics

    return list(pydoc_data.topics.topics.values())[:120]


@pytest.fixture(scope="session")
def byte_level_tokenizer(training_texts):
    return train_tokenizer(training_texts, "byte_level", 600)


@pytest.fixture(scope="session")
def metaspace_tokenizer(training_texts):
    return train_tokenizer(training_texts, "metaspace", 700)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, byte_level_tokenizer, metaspace_tokenizer) -> dict:
    """Two tiny local HF model folders: a Llama target (▁) and a GPT-2 source (Ġ)."""
    from fusion.testing.toy import save_model_dir, tiny_causal_lm

    root = tmp_path_factory.mktemp("models")
    return {
        "target": save_model_dir(
            root / "target", tiny_causal_lm("llama", len(metaspace_tokenizer)), metaspace_tokenizer
        ),
        "gpt2": save_model_dir(
            root / "gpt2", tiny_causal_lm("gpt2", len(byte_level_tokenizer)), byte_level_tokenizer
        ),
    }


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for every Ray test (2 CPUs, no dashboard, no token auth)."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    # "local": a new instance even where a test's multi-node cluster left its address behind
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prepared_world(tmp_path_factory, training_texts, ray_cluster):
    """A Llama target, a GPT-2 source and their prepared teacher data (clean settings: offsets,
    MinED, MinCE per token), shared by the training and teacher-data tests."""
    from fusion.config import parse_config
    from fusion.teacher.pipeline import prepare
    from fusion.testing.toy import save_model_dir, tiny_causal_lm

    root = tmp_path_factory.mktemp("train-world")
    target_tok = train_tokenizer(training_texts[:40], "metaspace", 600)
    source_tok = train_tokenizer(training_texts[:40], "byte_level", 500)
    save_model_dir(root / "target", tiny_causal_lm("llama", len(target_tok), seed=0), target_tok)
    save_model_dir(root / "source", tiny_causal_lm("gpt2", len(source_tok), seed=1), source_tok)
    with (root / "corpus.jsonl").open("w") as f:
        for text in training_texts[40:70]:
            f.write(json.dumps({"text": text[:1200]}) + "\n")
    raw = {
        "target": {"path": str(root / "target"), "num_cpus": 0.4},
        "sources": [{"name": "src", "path": str(root / "source"), "num_cpus": 0.4}],
        "data": {"paths": [str(root / "corpus.jsonl")], "max_length": 64},
        "align": {"method": "offsets", "mode": "clean"},
        "fuse": {"method": "min_ce", "granularity": "token"},
        "output": {"dir": str(root / "data"), "rows_per_file": 32},
    }
    prepare(parse_config(raw), quiet=True)
    return root, raw
