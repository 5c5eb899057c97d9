"""Run configurations: defaults, path resolution, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fusion.config import ConfigError, config_to_yaml, load_config, parse_config


def _raw(**changes) -> dict:
    raw = {
        "target": {"path": "models/target"},
        "sources": [{"name": "coder", "path": "models/gpt2"}],
        "data": {"paths": ["corpus/*.jsonl"]},
        "output": {"dir": "out"},
    }
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        node[leaf] = value
    return raw


def test_minimal_config_gets_reference_defaults():
    config = parse_config(_raw())
    assert (config.align.method, config.align.vocab_map, config.align.mode) == (
        "dtw",
        "mined",
        "reference",
    )
    assert (config.fuse.method, config.align.top_k, config.data.max_length) == ("min_ce", 10, 2048)
    assert config.sources[0].num_gpus == 0 and config.sources[0].actors == 1


@pytest.mark.parametrize(
    ("mode", "backend", "method"),
    [("reference", "hf", "dtw"), ("clean", "hf", "bytes"), ("clean", "vllm", "offsets")],
)
def test_auto_alignment_resolves_by_mode_and_backend(mode, backend, method):
    config = parse_config(_raw(**{"align.mode": mode, "sources.0.backend": backend}))
    assert config.align.method == method  # what the manifest's resolved config names


def test_relative_paths_are_resolved_against_the_config_folder(tmp_path):
    raw = _raw(**{"data.paths": ["s3://bucket/x", "c.txt"], "sources.0.path": "./gone/gpt2"})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "models" / "target").mkdir(parents=True)
    config = load_config(tmp_path / "run.yaml")
    assert config.target.path == str(tmp_path / "models" / "target")
    assert config.sources[0].path == str(tmp_path / "gone" / "gpt2")
    assert config.data.paths == ["s3://bucket/x", str(tmp_path / "c.txt")]


def test_a_model_path_like_a_hub_id_that_is_no_folder_stays_as_written(tmp_path):
    config = parse_config(_raw(**{"target.path": "org/model"}), base=tmp_path)
    assert config.target.path == "org/model"  # so the error can say it looks like a hub id


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = parse_config(_raw(), base=tmp_path)
    assert parse_config(yaml.safe_load(config_to_yaml(config))) == config


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_raw(**{"target.dtyp": "bfloat16"}), "target.dtyp: unknown key"),
        (
            _raw(**{"fuse.granularity": "prefix"}),
            r"fuse.granularity 'prefix' scores candidates .* set align.mode: clean",
        ),
        (_raw(**{"fuse.window": 0}), r"fuse.window: .*greater than or equal to 1"),
        (
            _raw(**{"sources.0.actors": 0}),
            r"sources.0.actors: .*greater than or equal to 1 \(got 0\)",
        ),
        (_raw(**{"sources.0.dtype": "fp8"}), r"sources.0.dtype: .*'float32'.*\(got 'fp8'\)"),
        (
            _raw(**{"sources": [{"name": "a", "path": "p"}, {"name": "a", "path": "q"}]}),
            "sources.1.name: 'a' is already the name of sources.0",
        ),
        (_raw(**{"sources.0.name": "my model"}), "sources.0.name: .*not a usable name"),
        (_raw(**{"sources.0.name": "fused"}), "reserved"),
        (_raw(**{"align.top_k": "ten"}), r"align.top_k: .*integer.*\(got 'ten'\)"),
        (_raw(**{"data.paths": []}), "data.paths: List should have at least 1 item"),
        ({"target": {"path": "t"}}, "sources: required but missing"),
        (["not", "a", "mapping"], "must be a mapping"),
        (_raw(**{"align.method": "bytes"}), "align.method 'bytes' is a clean-mode method"),
        (
            _raw(
                **{
                    "align.method": "bytes",
                    "align.mode": "clean",
                    "sources.0.backend": "vllm",
                }
            ),
            r"sources.0.backend: 'vllm' gives only a top-k",
        ),
        (_raw(**{"train.kd_tail": "spread"}), r"train.kd_tail: .*'renormalise' or 'bucket'"),
    ],
)
def test_bad_configs_name_the_field(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_missing_or_malformed_config_files_are_explained(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("target: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_every_shipped_config_parses():
    shipped = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert shipped
    for path in shipped:
        load_config(path)


def test_cluster_configs_parse_and_run_the_job_entrypoints():
    cluster = Path(__file__).parents[1] / "cluster"
    launcher = yaml.safe_load((cluster / "ray-cluster.yaml").read_text())
    assert {"head", "gpu_source", "gpu_train"} <= set(launcher["available_node_types"])
    rayjob = yaml.safe_load((cluster / "kuberay-rayjob.yaml").read_text())
    assert rayjob["kind"] == "RayJob"
    script = rayjob["spec"]["entrypoint"].split()[1]
    assert (Path(__file__).parents[1] / script).is_file()


def test_a_data_set_smaller_than_one_global_batch_is_a_user_error():
    from fusion.config import TrainConfig
    from fusion.errors import FusionError
    from fusion.train.resume import total_steps

    train = TrainConfig(global_batch_size=8, micro_batch_size=2, num_workers=2)
    assert (
        total_steps(train, 40) == 5
        and total_steps(train.model_copy(update={"max_steps": 3}), 40) == 3
    )
    with pytest.raises(FusionError, match="7 rows, fewer than one global batch of 8"):
        total_steps(train, 7)
