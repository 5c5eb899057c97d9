"""`fusion train`: Ray Train (TorchTrainer) with DeepSpeed or DDP on prepared teacher data.

The data set is checked against the target before any worker starts; checkpoints live under
the storage path and a re-run with ``resume: auto`` continues from the latest one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fusion.cluster import cluster_maximum, ensure_ray, training_check, unused_gpus
from fusion.config import ConfigError, FusionConfig, TrainConfig
from fusion.data.corpus import open_filesystem
from fusion.errors import FusionError, user_error_from
from fusion.models.loading import model_tokenizer, vocab_fingerprint
from fusion.teacher.output import complete_manifest, join
from fusion.train.batches import own_column, teacher_columns
from fusion.train.lam import auto_lam
from fusion.train.loop import train_loop_per_worker
from fusion.train.resume import total_steps

RUN_NAME = "fusion-train"
STRICT_DEVICE = "FUSION_STRICT_DEVICE"  # "1": workers refuse collectives off their device


class DatasetMismatchError(FusionError):
    """Teacher data that does not belong to this target or configuration."""


@dataclass(frozen=True)
class TrainSummary:
    """Where the trained model went and how far training got."""

    export_dir: str
    steps: int
    tokens_seen: int
    final_loss: float | None


def train_settings(run: FusionConfig) -> TrainConfig:
    return run.train if run.train is not None else TrainConfig()


def data_dir(run: FusionConfig) -> str:
    """The prepared data set: a URI, or a local folder made absolute (workers run elsewhere)."""
    folder = train_settings(run).data or run.output.dir
    return folder.rstrip("/") if "://" in folder else str(Path(folder).resolve())


def storage_dir(run: FusionConfig) -> Path:
    train = train_settings(run)
    if train.storage_path:
        return Path(train.storage_path)
    if "://" in data_dir(run):
        raise ConfigError(
            f"train.storage_path: required when the data set is at a URI ({data_dir(run)}); "
            "name a local or shared folder for checkpoints, metrics and the export"
        )
    return Path(data_dir(run)) / "train"


def check_dataset(run: FusionConfig) -> dict:
    """The data set's manifest, after checking it fits the target and the teacher asked for."""
    folder, teacher = data_dir(run), train_settings(run).teacher
    manifest = complete_manifest(
        folder,
        DatasetMismatchError,
        "run `fusion prepare` first, or point train.data at its output",
    )
    target = model_tokenizer(run.target)
    if manifest.get("target_vocab") != vocab_fingerprint(target):
        raise DatasetMismatchError(
            f"{folder} was prepared for another target tokenizer (vocabulary "
            f"{manifest.get('target_vocab')}, this target's {vocab_fingerprint(target)}): its "
            "token ids would mean other tokens"
        )
    filesystem, root = open_filesystem(folder)
    files = [join(root, f["file"]) for f in manifest["files"]]
    infos = filesystem.get_file_info(files)
    missing_files = [
        join(folder, f["file"])
        for f, i in zip(manifest["files"], infos, strict=True)
        if i.type != pafs.FileType.File
    ]
    if missing_files:
        raise DatasetMismatchError(f"files listed in the manifest are missing: {missing_files[:3]}")
    how = train_settings(run).verify_data
    for entry, info in zip(manifest["files"], infos, strict=True):
        verify_file(filesystem, info, entry, how, join(folder, entry["file"]))
    with filesystem.open_input_file(files[0]) as stream:
        schema = pq.read_schema(stream)
    first = Path(files[0])
    needed = teacher_columns(teacher)
    absent = [c for c in needed if c not in schema.names]
    if absent and set(absent) <= {own_column(teacher), f"{teacher}.tail"}:
        raise DatasetMismatchError(
            f"{first.name} lacks the columns {absent} (the teacher's fallback positions and "
            "the mass outside its top-k): it was prepared by an older fusion; re-run "
            "`fusion prepare`"
        )
    if absent:
        teachers = sorted({n.split(".")[0] for n in schema.names if n.endswith(".topk_ids")})
        raise DatasetMismatchError(
            f"{first.name} lacks columns {absent}; train.teacher must be one of {teachers}"
        )
    k = schema.field(f"{teacher}.topk_ids").type.value_type.list_size
    if k != manifest.get("top_k"):
        raise DatasetMismatchError(
            f"the files hold top-{k} teachers but the manifest says top-{manifest.get('top_k')}"
        )
    return manifest


def verify_file(
    filesystem: pafs.FileSystem, info: pafs.FileInfo, entry: dict, how: str, name: str
) -> None:
    """Refuse a teacher file whose size or SHA-256 differs from its manifest entry."""
    if info.size != entry["bytes"]:
        raise DatasetMismatchError(
            f"{name} has {info.size:,} bytes but the manifest says {entry['bytes']:,}: the file "
            "was truncated or replaced; re-run `fusion prepare` into a new output.dir"
        )
    if how == "sha256":
        digest = hashlib.sha256()
        with filesystem.open_input_stream(info.path) as stream:
            while block := stream.read(1 << 22):
                digest.update(block)
        if digest.hexdigest() != entry["sha256"]:
            raise DatasetMismatchError(
                f"{name}: its SHA-256 differs from the manifest's: the file is corrupted; "
                "re-run `fusion prepare` into a new output.dir"
            )


def train(run: FusionConfig, *, quiet: bool = False) -> TrainSummary:
    """Train the target on the prepared data; return where the HF export went."""
    train = train_settings(run)
    run = run.model_copy(update={"train": train})
    manifest = check_dataset(run)
    total_steps(train, manifest["rows"])  # refuse a data set smaller than one global batch
    if train.lam == "auto":
        lam, why = auto_lam(manifest, train.teacher, data_dir(run))
        print(why, file=sys.stderr)
        train = train.model_copy(update={"lam": lam})
        run = run.model_copy(update={"train": train})
    ray = ensure_ray(run)
    if note := training_check(run, ray.cluster_resources(), cluster_maximum(run)):
        print(note, file=sys.stderr)
    if note := unused_gpus(run, ray.cluster_resources()):
        print(note, file=sys.stderr)
    folder = data_dir(run)
    files = [{"path": join(folder, f["file"]), "rows": f["rows"]} for f in manifest["files"]]
    info = {"path": folder, "rows": manifest["rows"], "tokens": manifest["tokens"]}
    bos = manifest.get("target_bos")  # absent from data sets read without a target BOS
    return fit(run, files, bos=bos, dataset_info=info, quiet=quiet)


def fit(
    run: FusionConfig,
    data,
    *,
    bos: int | None,
    dataset_info: dict,
    quiet: bool,
) -> TrainSummary:
    """Run the TorchTrainer; ``bos`` starts every training row when the target reads its
    text after one.

    ``data`` is a materialised data set's files (``path``, ``rows``), of which every worker
    reads only its own share in an order fixed by seed and epoch (fusion.data.share: resuming is
    exact and starts reading at its position), or a streamed Ray Dataset, which arrives in
    corpus order and is split between the workers as they ask for rows.
    """
    import ray.data
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = run.train
    storage = storage_dir(run).resolve()
    if train.resume == "never" and (storage / RUN_NAME).exists():
        raise FusionError(
            f"{storage / RUN_NAME} holds an earlier run and train.resume is 'never': choose "
            "another train.storage_path or set resume: auto"
        )
    storage.mkdir(parents=True, exist_ok=True)
    export_dir = storage / "export"
    streamed = not isinstance(data, list)
    rows = None if streamed else sum(f["rows"] for f in data)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "run": run.model_dump(mode="json"),
            "rows": rows,
            "files": None if streamed else data,
            "bos": bos,
            "strict_device": os.environ.get(STRICT_DEVICE) == "1",
            "storage": str(storage),
            "export_dir": str(export_dir),
            "quiet": quiet,
            "dataset": dataset_info,
        },
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker}
            | ({"GPU": 1} if train.use_gpu else {})
            | train.resources,
            accelerator_type=train.accelerator_type,
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=train.max_failures),
        ),
        datasets={"train": data} if streamed else {},
        dataset_config=ray.train.DataConfig(
            datasets_to_split="all",
            # In order, so a streamed run read by one worker resumes exactly (see run.py).
            execution_options=ray.data.ExecutionOptions(preserve_order=True),
        ),
    )
    try:
        trainer.fit()
    except Exception as error:  # a worker's user error arrives wrapped by Ray Train
        user_error = user_error_from(error)
        if user_error is None:
            raise
        raise user_error from None
    summary = json.loads((export_dir / "training_summary.json").read_text())
    losses = summary["losses"]
    return TrainSummary(
        export_dir=str(export_dir),
        steps=summary["steps"],
        tokens_seen=summary["tokens_seen"],
        final_loss=losses[-1][1] if losses else None,
    )
