"""The pipeline's batch functions on hand-made batches (no Ray needed)."""

from __future__ import annotations

import numpy as np
import pytest

from fusion.align import PAD_ID, VocabBridge
from fusion.config import AlignConfig, FuseConfig
from fusion.data.reader import object_array
from fusion.teacher.fuse import MIXED, NO_TEACHER
from fusion.teacher.stages import align_row, fuse_batch
from tests.imports import packages_loaded_by

VOCAB = 10  # the hand-made batches' target vocabulary


def _batch():
    ids = lambda rows: object_array([np.asarray(r, np.int32) for r in rows])  # noqa: E731
    logits = lambda rows: object_array([np.asarray(r, np.float32) for r in rows])  # noqa: E731
    return {
        "id": np.asarray(["d:0"], dtype=object),
        "input_ids": object_array([np.asarray([5, 6, 7], np.int32)]),
        "target.topk_ids": ids([[[6, 1], [7, 2], [2, PAD_ID]]]),
        "target.topk_logits": logits([[[2.0, 0.0], [1.0, 0.5], [1.0, -np.inf]]]),
        "target.ce": np.asarray([1.0], np.float32),
        "src.topk_ids": ids([[[1, 6], [7, 3], [PAD_ID, PAD_ID]]]),
        "src.topk_logits": logits([[[3.0, 0.0], [4.0, 0.0], [-np.inf, -np.inf]]]),
        "src.ce": np.asarray([2.0], np.float32),
        "src.aligned": object_array([np.asarray([True, True, False])]),
        "text": np.asarray(["abc"], dtype=object),
        "target.nll": np.asarray([2.0], np.float32),
        "src.nll": np.asarray([6.0], np.float32),
        "target.tail": object_array([np.asarray([0.1, 0.2, 0.3], np.float32)]),
        "src.tail": object_array([np.asarray([0.4, 0.05, 0.0], np.float32)]),
    }


def test_sequence_min_ce_takes_one_candidate_for_the_whole_row():
    out = fuse_batch(_batch(), ["target", "src"], FuseConfig(), "reference", VOCAB)
    assert out["fused.choice"][0].tolist() == [0, 0, 0]
    assert out["fused.topk_ids"][0].tolist() == [[6, 1], [7, 2], [2, PAD_ID]]


def test_token_min_ce_mixes_candidates_by_position():
    fuse = FuseConfig(granularity="token")
    out = fuse_batch(_batch(), ["target", "src"], fuse, "clean", VOCAB)
    # position 0 predicts 6: target gives it p=0.88, the source p=0.05; position 1 predicts 7:
    # the source is surer; position 2 has no label, so nobody can teach it: in clean mode
    # the fallback would be the next token, and there is none.
    assert out["fused.topk_ids"][0].tolist() == [[6, 1], [7, 3], [PAD_ID, PAD_ID]]
    assert out["fused.choice"][0].tolist() == [0, 1, NO_TEACHER]


def test_avg_ce_fuses_a_mixture_and_marks_it_mixed():
    out = fuse_batch(_batch(), ["target", "src"], FuseConfig(method="avg_ce"), "clean", VOCAB)
    first = out["fused.topk_ids"][0][0].tolist()
    assert set(first) <= {6, 1}
    assert np.exp(out["fused.topk_logits"][0][0]).sum() == pytest.approx(1.0, abs=1e-6)
    assert out["fused.choice"][0].tolist() == [MIXED, MIXED, MIXED]


def test_per_byte_sequence_ce_compares_total_nll_over_the_text_bytes():
    # Per token the target wins (CE 1.0 against 2.0). Per byte of the 3-byte text the target's
    # total NLL 9.0 gives 3.0 and the source's 6.0 gives 2.0: the source wins.
    batch = _batch()
    batch["target.nll"] = np.asarray([9.0], np.float32)  # 3.0 nats per byte
    per_token = fuse_batch(_batch(), ["target", "src"], FuseConfig(ce_unit="token"), "clean", VOCAB)
    per_byte = fuse_batch(batch, ["target", "src"], FuseConfig(ce_unit="byte"), "clean", VOCAB)
    assert per_token["fused.choice"][0].tolist() == [0, 0, 0]
    # the source (6.0 / 3 = 2.0 per byte) wins where it is aligned; position 2 falls to target
    assert per_byte["fused.choice"][0].tolist() == [1, 1, 0]


def test_align_row_pairs_the_eos_tokens_after_the_text(golden):
    vocab = golden["vocab"]
    bridge = VocabBridge.build(vocab["source_vocab"], vocab["target_vocab"])
    text = "Hello world"
    target_ids = np.asarray([3, 4, 2])  # ▁Hello ▁world </s>
    source_ids = np.asarray([1, 2, 0])  # Hello Ġworld <|endoftext|>
    target_offsets = np.asarray([[0, 5], [5, 11]])
    source_offsets = np.asarray([[0, 5], [5, 11]])
    for method in ("dtw", "offsets"):
        alignment = align_row(
            bridge,
            AlignConfig(method=method),
            target_ids,
            target_offsets,
            source_ids,
            source_offsets,
            text,
        )
        assert alignment.target_to_source == [[0], [1], [2]]
    without_source_eos = align_row(
        bridge, AlignConfig(), target_ids, target_offsets, source_ids[:2], source_offsets, text
    )
    assert without_source_eos.target_to_source[-1] == []


def test_model_actors_use_the_configured_torch_threads(model_dirs):
    import torch

    from fusion.config import SourceConfig
    from fusion.teacher.stages import ForwardStage

    before = torch.get_num_threads()
    try:
        for threads, expected in ((2, 2), (None, 1)):
            source = SourceConfig(name="s", path=str(model_dirs["gpt2"]), cpu_threads=threads)
            ForwardStage("s", source, num_cpus=0.25, num_gpus=0, top_k=3)
            assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)


def test_fused_tail_is_the_chosen_candidates_or_what_the_mixture_leaves_out():
    batch = _batch()
    token = fuse_batch(batch, ["target", "src"], FuseConfig(granularity="token"), "clean", VOCAB)
    # choices [target, src, none]: tails 0.1 (target's), 0.05 (src's), 0 (no teacher), each
    # as the data set stores it (float16), so that fusing it again from its files agrees
    stored = [float(np.float16(0.1)), float(np.float16(0.05)), 0.0]
    np.testing.assert_allclose(token["fused.tail"][0], stored, rtol=1e-6)
    assert stored[0] != 0.1
    avg_ce = FuseConfig(method="avg_ce", granularity="token")
    mixed = fuse_batch(_batch(), ["target", "src"], avg_ce, "clean", VOCAB)
    # position 0 by hand: AvgCE weights softmax(-ce) over the per-token CEs of both candidates
    # (both hold the label 6), each candidate's top-k renormalised, its full distribution
    # scaled by 1 - tail; the tail is what that mixture puts outside the ids it keeps.
    target_p = np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum()  # ids 6, 1
    src_p = np.exp([3.0, 0.0]) / np.exp([3.0, 0.0]).sum()  # ids 1, 6
    ce = np.array([-np.log(target_p[0]), -np.log(src_p[1])])
    weights = np.exp(-ce) / np.exp(-ce).sum()
    kept = set(mixed["fused.topk_ids"][0][0].tolist()) - {PAD_ID}
    on_kept = [
        sum(p for i, p in zip([6, 1], target_p, strict=True) if i in kept),
        sum(p for i, p in zip([1, 6], src_p, strict=True) if i in kept),
    ]
    kept_mass = 1 - np.float16([0.1, 0.4]).astype(np.float64)  # the tails as stored
    expected = 1 - (weights * kept_mass * on_kept).sum()
    assert mixed["fused.tail"][0][0] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("ce_unit", "mode"), [("byte", "clean"), ("auto", "clean")])
def test_per_byte_avg_ce_weights_divide_each_total_nll_by_the_texts_utf8_bytes(ce_unit, mode):
    """AvgCE per sequence mixes by softmax(-CE): the unit changes the weights, so the fused
    distribution tells bytes (9 here) from characters (3), tokens (3) or nothing."""
    batch = _batch()
    batch["text"] = np.asarray(["é中😀"], dtype=object)  # 2 + 3 + 4 bytes
    batch["target.nll"] = np.asarray([9.0], np.float32)  # 1.0 nats per byte
    batch["src.nll"] = np.asarray([4.5], np.float32)  # 0.5 nats per byte
    fuse = FuseConfig(method="avg_ce", granularity="sequence", ce_unit=ce_unit)
    out = fuse_batch(batch, ["target", "src"], fuse, mode, VOCAB)
    weights = np.exp([-1.0, -0.5]) / np.exp([-1.0, -0.5]).sum()
    # position 1: target {7: e^1, 2: e^0.5}, source {7: e^4, 3: e^0}, each renormalised
    target = {7: np.exp(1.0), 2: np.exp(0.5)}
    source = {7: np.exp(4.0), 3: np.exp(0.0)}
    mixed: dict[int, float] = {}
    for weight, dist in zip(weights, (target, source), strict=True):
        total = sum(dist.values())
        for token, value in dist.items():
            mixed[token] = mixed.get(token, 0.0) + weight * value / total
    ids = out["fused.topk_ids"][0][1].tolist()
    probs = np.exp(out["fused.topk_logits"][0][1])
    assert ids == [7, 2]  # k = 2: the two most probable of the mixture
    np.testing.assert_allclose(probs, [mixed[7], mixed[2]], rtol=1e-6)


def test_the_stages_module_loads_without_torch_or_transformers():
    # Every Ray worker of an align, fuse or write stage imports fusion.teacher.stages: only the
    # reading and model stages need torch and transformers, and import them when built.
    stages = ["fusion.teacher.stages", "fusion.data.reader"]
    assert packages_loaded_by(stages, ["torch", "transformers", "numba"]) == []


READER = """
import json, pickle, sys
from fusion.config import DataConfig
from fusion.data.corpus import plan_shards
from fusion.data.reader import ChunkStage

data = DataConfig(paths=[sys.argv[1]], max_length=12)
descriptor = {k: [v] for k, v in plan_shards(data)[0].descriptor().items()}
with open(sys.argv[2], "rb") as stream:
    tokenizer = pickle.load(stream)
out = ChunkStage(data, {}, tokenizer=tokenizer)(descriptor)
print(json.dumps({
    "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch"),
    "ids": [list(map(int, ids)) for ids in out["input_ids"]],
    "offsets": [[list(map(int, span)) for span in spans] for spans in out["offsets"]],
}))
"""


def test_a_reader_given_the_drivers_tokenizer_chunks_as_one_that_loads_it_and_needs_no_torch(
    model_dirs, tmp_path
):
    import functools
    import json
    import pickle
    import subprocess
    import sys

    from fusion.config import DataConfig
    from fusion.data.corpus import plan_shards
    from fusion.data.reader import ChunkStage
    from fusion.models.loading import load_tokenizer
    from tests.imports import ROOT

    corpus = tmp_path / "corpus.jsonl"
    texts = ["def f(x):\n\treturn x  # tab\n", "naïve café — 日本語 text\n\nand more", " \t\n "]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    target = str(model_dirs["target"])
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(load_tokenizer(target)))
    done = subprocess.run(
        [sys.executable, "-c", READER, str(corpus), str(tmp_path / "tokenizer.pkl")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    shipped = json.loads(done.stdout)

    data = DataConfig(paths=[str(corpus)], max_length=12)
    descriptor = {k: [v] for k, v in plan_shards(data)[0].descriptor().items()}
    loads = functools.partial(load_tokenizer, target)  # as a remote-code tokenizer comes
    loaded = ChunkStage(data, {}, load_tokenizer=loads)(descriptor)
    assert shipped["torch"] == []
    assert len(shipped["ids"]) > len(texts)  # long documents give several chunks
    assert shipped["ids"] == [ids.tolist() for ids in loaded["input_ids"]]
    assert shipped["offsets"] == [np.asarray(o).reshape(-1, 2).tolist() for o in loaded["offsets"]]


def test_readers_get_the_loaded_tokenizer_or_for_remote_code_a_function_that_loads_it(
    model_dirs, tmp_path
):
    from fusion.config import parse_config
    from fusion.data.reader import ChunkStage
    from fusion.teacher.pipeline import reader_tokenizer
    from fusion.teacher.plan import resolve

    def config(remote: bool):
        target = {"path": str(model_dirs["target"]), "trust_remote_code": remote}
        return parse_config(
            {
                "target": target,
                "sources": [{"name": "coder", "path": str(model_dirs["gpt2"])}],
                "data": {"paths": [str(tmp_path)]},
                "output": {"dir": str(tmp_path / "out")},
            }
        )

    shipped = reader_tokenizer(resolve(config(False)))
    loaded = reader_tokenizer(resolve(config(True)))
    assert set(shipped) == {"tokenizer"} and set(loaded) == {"load_tokenizer"}
    text = "def f(x):\n\treturn x — ünïcode"
    expected = shipped["tokenizer"](text, return_offsets_mapping=True)
    assert loaded["load_tokenizer"]()(text, return_offsets_mapping=True) == expected
    with pytest.raises(ValueError, match="a tokenizer or a function that loads one"):
        ChunkStage(config(False).data, {})


def _two_halves() -> dict:
    """Seven positions predicting 6 7 8 5 6 7 (then nothing): the target is sure of the label
    on the first three (p = e²/(e²+1)), the source on the next three (p = e^2.5/(e^2.5+1))."""
    ids = lambda rows: object_array([np.asarray(r, np.int32) for r in rows])  # noqa: E731
    values = lambda rows: object_array([np.asarray(r, np.float32) for r in rows])  # noqa: E731
    labels = [6, 7, 8, 5, 6, 7, 1]
    target = [[2.0, 0.0]] * 3 + [[0.0, 1.0]] * 3 + [[0.0, 0.0]]
    source = [[0.0, 1.5]] * 3 + [[2.5, 0.0]] * 3 + [[0.0, 0.0]]
    return {
        "id": np.asarray(["d:0"], dtype=object),
        "input_ids": ids([[5, 6, 7, 8, 5, 6, 7]]),
        "target.topk_ids": ids([[[label, 1] for label in labels]]),
        "target.topk_logits": values([target]),
        "target.tail": values([[0.0] * 7]),
        "src.topk_ids": ids([[[label, 2] for label in labels]]),
        "src.topk_logits": values([source]),
        "src.tail": values([[0.0] * 7]),
        "src.aligned": object_array([np.ones(7, bool)]),
    }


def test_window_min_ce_takes_the_candidate_best_on_each_block():
    """Blocks of 3: the target on positions 0-2, the source on 3-5; position 6 has no label,
    so no candidate has a CE there and the first (the target) takes it."""
    fuse = FuseConfig(granularity="window", window=3)
    out = fuse_batch(_two_halves(), ["target", "src"], fuse, "clean", VOCAB)
    assert out["fused.choice"][0].tolist() == [0, 0, 0, 1, 1, 1, 0]
    assert out["fused.topk_ids"][0][4].tolist() == [6, 2]


def test_prefix_rules_weigh_candidates_by_the_positions_before_never_the_label_itself():
    """Looking back 2 positions: the target's NLL is a = -log σ(2) on 0-2 and c = -log σ(-1)
    on 3-5, the source's b = -log σ(-1.5) and d = -log σ(2.5). The source takes over at
    position 5 (its CE d against c on 3-4), not at 3 where its own label first favours it."""
    nll = {
        "target": [-np.log(1 / (1 + np.exp(-2.0)))] * 3 + [-np.log(1 / (1 + np.exp(1.0)))] * 3,
        "src": [-np.log(1 / (1 + np.exp(1.5)))] * 3 + [-np.log(1 / (1 + np.exp(-2.5)))] * 3,
    }
    fuse = FuseConfig(granularity="prefix", window=2)
    out = fuse_batch(_two_halves(), ["target", "src"], fuse, "clean", VOCAB)
    assert out["fused.choice"][0].tolist() == [0, 0, 0, 0, 0, 1, 1]
    mixture = fuse.model_copy(update={"method": "avg_ce"})
    mixed = fuse_batch(_two_halves(), ["target", "src"], mixture, "clean", VOCAB)
    # position 4 mixes by softmax(-CE) over positions 2-3: the target's (a + c)/2, the
    # source's (b + d)/2; the label 6 is the first id of both
    ce = np.asarray([np.mean(nll["target"][2:4]), np.mean(nll["src"][2:4])])
    weights = np.exp(-ce) / np.exp(-ce).sum()
    p_label = weights[0] / (1 + np.exp(1.0)) + weights[1] / (1 + np.exp(-2.5))
    ids, logits = mixed["fused.topk_ids"][0][4].tolist(), mixed["fused.topk_logits"][0][4]
    assert ids[0] == 6 and np.exp(logits[0]) == pytest.approx(p_label, rel=1e-5)
