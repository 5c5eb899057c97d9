"""The data set's fingerprint covers every setting that changes the stored rows: a re-run with
any one of them changed is refused on the same output, and one that changes only resources,
placement or logging goes on where it stopped."""

from __future__ import annotations

import copy

import pytest

from fusion.config import (
    AlignConfig,
    DataConfig,
    FuseConfig,
    SourceConfig,
    TargetConfig,
    parse_config,
)
from fusion.teacher.contract import fingerprint
from fusion.teacher.output import OutputDir, OutputError

BASE = {
    "target": {"path": "models/target"},
    "sources": [{"name": "coder", "path": "models/coder"}],
    "data": {"paths": ["corpus/a.jsonl"]},
    "align": {"mode": "clean", "method": "offsets"},
    "output": {"dir": "out"},
}

# Every field of the sections the rows depend on, with a value other than the base's.
CHANGES_ROWS = {
    "target.path": "models/other",
    "target.dtype": "bfloat16",
    "target.attention": "sdpa",
    "target.gguf_file": "model.gguf",
    "target.bos": "never",
    "target.as_teacher": False,
    "sources.0.name": "writer",
    "sources.0.path": "models/other",
    "sources.0.dtype": "float16",
    "sources.0.attention": "sdpa",
    "sources.0.gguf_file": "model.gguf",
    "sources.0.bos": "always",
    "sources.0.backend": "vllm",
    "sources.0.max_length": 64,
    "data.paths": ["corpus/b.jsonl"],
    "data.format": "text",
    "data.text_field": "body",
    "data.id_field": "doc",
    "data.domain_field": "kind",
    "data.max_length": 512,
    "data.shard_mb": 8.0,
    "align.method": "bytes",
    "align.vocab_map": "exact",
    "align.mode": "reference",
    "align.top_k": 5,
    "fuse.method": "avg_ce",
    "fuse.granularity": "token",
    "fuse.ce_unit": "token",
    "fuse.no_teacher": "mask",
}
KEEPS_ROWS = {
    "target.gpu_memory_fraction": 0.5,
    "target.device": "cpu",
    "target.trust_remote_code": True,
    "target.allow_pickle": True,
    "target.cpu_threads": 3,
    "target.logits_budget_mb": 32,
    "target.actors": 2,
    "target.num_cpus": 0.5,
    "target.num_gpus": 1.0,
    "target.batch_size": 2,
    "target.max_actors": 4,
    "target.resources": {"a100_80g": 1},
    "target.accelerator_type": "A100",
    "sources.0.gpu_memory_fraction": 0.5,
    "sources.0.device": "cpu",
    "sources.0.trust_remote_code": True,
    "sources.0.allow_pickle": True,
    "sources.0.cpu_threads": 3,
    "sources.0.logits_budget_mb": 32,
    "sources.0.actors": 2,
    "sources.0.align_actors": 3,
    "sources.0.num_cpus": 0.5,
    "sources.0.num_gpus": 1.0,
    "sources.0.batch_size": 2,
    "sources.0.max_actors": 4,
    "sources.0.resources": {"a100_80g": 1},
    "sources.0.accelerator_type": "A100",
    "data.block_chunks": 8,
    "data.readers": 2,
    "align.map_cache": None,
}
# A benchmark stand-in's speed: valid only with backend 'simulated', whose rows it never sets.
# The fusion window counts only under the rules that read it (tested on its own below).
CONDITIONAL = {"sources.0.simulated_tokens_per_s", "fuse.window"}


def _changed(dotted: str, value) -> dict:
    raw = copy.deepcopy(BASE)
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    node[leaf] = value
    return raw


def test_every_field_is_classified_as_changing_the_rows_or_not():
    sections = {
        "target": TargetConfig,
        "sources.0": SourceConfig,
        "data": DataConfig,
        "align": AlignConfig,
        "fuse": FuseConfig,
    }
    fields = {f"{prefix}.{name}" for prefix, cls in sections.items() for name in cls.model_fields}
    classified = [*CHANGES_ROWS, *KEEPS_ROWS, *CONDITIONAL]
    assert len(classified) == len(set(classified))
    assert set(classified) == fields


@pytest.mark.parametrize(("field", "value"), list(CHANGES_ROWS.items()))
def test_a_rerun_with_a_setting_that_changes_the_rows_is_refused(tmp_path, field, value):
    base, changed = parse_config(BASE), parse_config(_changed(field, value))
    out = OutputDir(str(tmp_path / "out"))
    out.claim(fingerprint(base), base.model_dump(mode="json"))
    with pytest.raises(OutputError, match="holds another run"):
        out.claim(fingerprint(changed), changed.model_dump(mode="json"))


@pytest.mark.parametrize(("field", "value"), list(KEEPS_ROWS.items()))
def test_a_rerun_with_other_resources_goes_on_with_the_same_output(tmp_path, field, value):
    base, changed = parse_config(BASE), parse_config(_changed(field, value))
    out = OutputDir(str(tmp_path / "out"))
    out.claim(fingerprint(base), base.model_dump(mode="json"))
    (tmp_path / "out" / "data" / "part.parquet").write_bytes(b"kept")
    out.claim(fingerprint(changed), changed.model_dump(mode="json"))
    assert (tmp_path / "out" / "data" / "part.parquet").read_bytes() == b"kept"


def test_a_source_without_max_length_keeps_the_fingerprint_it_had():
    """Data sets prepared before a source's max_length entered the fingerprint are still
    their config's own: the base config's hash as the code before that change computed it."""
    assert fingerprint(parse_config(BASE)) == "cb1de6d2fdc8306d"


@pytest.mark.parametrize("granularity", ["window", "prefix"])
def test_the_fusion_window_changes_the_rows_only_under_the_rules_that_read_it(
    tmp_path, granularity
):
    local = _changed("fuse.granularity", granularity)
    base = parse_config(local)
    wider = parse_config(local | {"fuse": local["fuse"] | {"window": 64}})
    out = OutputDir(str(tmp_path / "out"))
    out.claim(fingerprint(base), base.model_dump(mode="json"))
    with pytest.raises(OutputError, match="holds another run"):
        out.claim(fingerprint(wider), wider.model_dump(mode="json"))
    sequence = parse_config(BASE)
    assert fingerprint(sequence) == fingerprint(parse_config(_changed("fuse.window", 64)))


# Where each setting that changes the rows acts, once each candidate's columns are a unit
# of their own: the chunking (a re-run on the same output is refused, naming the field), a
# unit's settings (that unit is computed again alone), only the fusion (re-fused, no model),
# or the model's files (hashed: tested with real folders in test_units.py).
LAYER = {
    "target.path": "files",
    "sources.0.path": "files",
    "sources.0.name": "fusion",  # another unit's name: computed as a new one
    "target.as_teacher": "fusion",
    **{f: "chunking" for f in CHANGES_ROWS if f.startswith("data.")},
    **{f: "fusion" for f in CHANGES_ROWS if f.startswith("fuse.")},
}


def _layers(raw: dict) -> tuple[dict, dict, dict]:
    """The chunking key and both units' settings of a config, its tokenizers left out (the
    target's vocabulary and BOS are fixed here; the tokenizer tests cover those)."""
    from fusion.data.corpus import Shard
    from fusion.teacher.plan import ModelPlan, RunPlan, chunking_key, unit_settings

    config = parse_config(raw)
    source = config.sources[0]
    plan = RunPlan(
        config=config,
        target=ModelPlan("target", config.target, "target", None),
        sources={source.name: ModelPlan(source.name, source, "sources.0", None)},
        vocab_size=100,
        target_vocab="v",
        target_bos=1,
    )
    chunking = chunking_key(plan, [Shard(0, config.data.paths[0], "jsonl", size=10)])
    return chunking, unit_settings(plan, "target"), unit_settings(plan, source.name)


@pytest.mark.parametrize(("field", "value"), list(CHANGES_ROWS.items()))
def test_each_setting_that_changes_the_rows_acts_on_its_own_layer(field, value):
    base, changed = _layers(copy.deepcopy(BASE)), _layers(_changed(field, value))
    layer = LAYER.get(field, "unit")
    if layer == "chunking":
        assert base[0] != changed[0]
        assert field in {k for k in base[0] if base[0][k] != changed[0][k]}  # named
    elif layer == "unit":
        assert base[0] == changed[0]
        assert base[1:] != changed[1:]
    else:  # fusion or files: neither the chunks nor a unit's settings
        assert base == changed
    assert fingerprint(parse_config(BASE)) != fingerprint(parse_config(_changed(field, value)))


@pytest.mark.parametrize(("field", "value"), list(KEEPS_ROWS.items()))
def test_a_setting_that_keeps_the_rows_changes_no_layer(field, value):
    assert _layers(copy.deepcopy(BASE)) == _layers(_changed(field, value))
