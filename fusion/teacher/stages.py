"""The Ray Data stages of `fusion prepare` after reading, each a callable on a batch (dict
of numpy arrays).

Rows arrive from the reader (fusion.data.reader) with ``id`` (``doc_id:chunk``), ``domain``,
``text``, ``input_ids``, the target's ``offsets``, ``shard`` and ``shard_total``. Model
stages add ``<name>.raw_*`` columns in the model's own vocabulary; the align stage turns them
into ``<name>.topk_ids/topk_logits`` in target ids; the fuse stage adds ``fused.*``.
Callable classes hold what is expensive to build (models, vocabulary bridges).

Every Ray worker that runs a stage imports this module: torch and transformers are imported
only by the model stage, so the align, fuse and write workers start in a fraction of the
time.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from fusion.align import VocabBridge, dtw_align, offset_align
from fusion.align.alignment import Alignment
from fusion.align.projection import ByteProjection
from fusion.align.transfer import PAD_ID
from fusion.config import AlignConfig, FuseConfig, ModelConfig
from fusion.data.reader import object_array
from fusion.teacher.diagnostics import teacher_counts
from fusion.teacher.fuse import (
    as_stored,
    fuse_topk,
    label_nll,
    local_ce,
    tail_mass,
    topk_token_ce,
)
from fusion.teacher.output import OutputDir
from fusion.teacher.rows import FUSED, TARGET, candidate_aligned, next_tokens, to_table

if TYPE_CHECKING:
    pass


def set_threads(num_cpus: float, threads: int | None = None) -> None:
    """Torch threads of this worker: ``threads`` when configured, else the CPUs Ray reserved
    for it (fractions get one thread)."""
    import torch

    torch.set_num_threads(threads or max(1, int(num_cpus)))


def predicted_bytes(text: str, offsets: np.ndarray, bos_read: bool) -> int:
    """UTF-8 bytes of the text a model's NLL predicts: its tokens as read, spans end to end,
    the first one only when a BOS was read before it."""
    spans = np.asarray(offsets).reshape(-1, 2)
    if not len(spans):
        return 0
    start = 0 if bos_read else int(spans[0][1])
    return len(text[start : int(spans[-1][1])].encode("utf-8"))


def node_column(name: str) -> str:
    """The column naming the Ray node whose actor read candidate ``name`` (not stored in
    the data set: each unit's commits record their nodes)."""
    return f"node.{name}"


def current_node() -> str:
    """The id of the Ray node this process runs on ('' outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


class ForwardStage:
    """Runs one model over every chunk's text and keeps its top-k per position.

    The target reads its own ``input_ids``; a source tokenizes the same text itself. With a
    ``projection`` (``align.method: bytes``) a source's full distributions are projected into
    target ids here, and its columns leave in target space (no align stage follows).
    """

    def __init__(
        self,
        name: str,
        model: ModelConfig,
        *,
        num_cpus: float,
        num_gpus: float,
        top_k: int,
        mode: str = "clean",
        projection: ByteProjection | None = None,
    ):
        set_threads(num_cpus, model.cpu_threads)
        self.name = name
        self.projection = projection
        self.field = "target" if name == TARGET else f"source {name!r}"
        kind = getattr(model, "backend", "hf")
        if kind == "vllm":
            from fusion.teacher.backends.vllm import VLLMTopK as backend
        elif kind == "simulated":
            from fusion.teacher.backends.simulated import SimulatedTopK as backend
        else:
            from fusion.teacher.backends.hf import HFTopK as backend
        read_bos = mode == "clean"  # the reference reads without BOS
        self.reader = backend(model, self.field, num_gpus=num_gpus, top_k=top_k, read_bos=read_bos)
        self.node = current_node()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        row_ids = list(batch["id"])
        texts = [str(text) for text in batch["text"]]
        if self.name == TARGET:
            sequences, offsets = list(batch["input_ids"]), list(batch["offsets"])
        else:
            encoded = [
                self.reader.encode(text, len(ids) > len(offs))
                for text, ids, offs in zip(texts, batch["input_ids"], batch["offsets"], strict=True)
            ]
            sequences, offsets = [e[0] for e in encoded], [e[1] for e in encoded]
        batch[node_column(self.name)] = np.full(len(row_ids), self.node, dtype=object)
        bos_read = self.reader.bos is not None
        batch[f"{self.name}.nll_bytes"] = np.asarray(
            [predicted_bytes(t, o, bos_read) for t, o in zip(texts, offsets, strict=True)],
            dtype=np.int64,
        )
        if self.projection is not None:
            return self._projected(batch, texts, sequences, offsets, row_ids)
        results = self.reader.read(sequences, row_ids)
        prefix = f"{self.name}.raw_" if self.name != TARGET else f"{self.name}."
        batch[f"{prefix}topk_ids"] = object_array([r.ids for r in results])
        batch[f"{prefix}topk_logits"] = object_array([r.logits for r in results])
        batch[f"{self.name}.ce"] = np.asarray([r.ce for r in results], dtype=np.float32)
        batch[f"{self.name}.nll"] = np.asarray([r.nll for r in results], dtype=np.float32)
        if self.name == TARGET:
            batch[f"{TARGET}.tail"] = object_array([tail_mass(r.logits, r.lse) for r in results])
        else:
            batch[f"{self.name}.raw_lse"] = object_array([r.lse for r in results])
            batch[f"{self.name}.raw_ids"] = object_array(sequences)
            batch[f"{self.name}.raw_offsets"] = object_array(offsets)
        return batch

    def _projected(self, batch, texts, sequences, offsets, row_ids) -> dict[str, np.ndarray]:
        """The source's distributions projected into target ids at every target position
        (positions past the text, i.e. after the target's EOS, get none)."""
        plans = [
            self.projection.plan(text, ids, target_offsets, source_ids, source_offsets, bos)
            for text, ids, target_offsets, source_ids, source_offsets, bos in zip(
                texts,
                batch["input_ids"],
                batch["offsets"],
                sequences,
                offsets,
                [self.reader.bos is not None] * len(texts),
                strict=True,
            )
        ]
        results = self.reader.read_projected(sequences, row_ids, plans, self.projection)
        columns: dict[str, list] = {"topk_ids": [], "topk_logits": [], "tail": [], "aligned": []}
        for result, input_ids in zip(results, batch["input_ids"], strict=True):
            extra = len(input_ids) - len(result.aligned)  # the EOS position predicts nothing
            columns["topk_ids"].append(
                np.pad(result.ids, ((0, extra), (0, 0)), constant_values=PAD_ID)
            )
            columns["topk_logits"].append(
                np.pad(result.logits, ((0, extra), (0, 0)), constant_values=-np.inf)
            )
            columns["tail"].append(np.pad(result.tail, (0, extra)))
            columns["aligned"].append(np.pad(result.aligned, (0, extra)))
        for key, values in columns.items():
            batch[f"{self.name}.{key}"] = object_array(values)
        batch[f"{self.name}.ce"] = np.asarray([r.ce for r in results], dtype=np.float32)
        batch[f"{self.name}.nll"] = np.asarray([r.nll for r in results], dtype=np.float32)
        return batch


def align_row(
    bridge: VocabBridge,
    align: AlignConfig,
    target_ids: np.ndarray,
    target_offsets: np.ndarray,
    source_ids: np.ndarray,
    source_offsets: np.ndarray,
    text: str,
) -> Alignment:
    """Align the text tokens of both sides (DTW or offsets) and pair trailing EOS tokens."""
    n_target, n_source = len(target_offsets), len(source_offsets)
    if align.method == "dtw":
        text_alignment = dtw_align(
            [bridge.source_vocab[i] for i in source_ids[:n_source]],
            [bridge.target_vocab[i] for i in target_ids[:n_target]],
            source_marker=bridge.source_marker,
            target_marker=bridge.target_marker,
            tie_break="fusellm" if align.mode == "reference" else "fusechat",
        )
    else:
        text_alignment = offset_align(source_offsets, target_offsets, text)
    pairs = list(text_alignment.target_to_source)
    if len(target_ids) > n_target:  # the target's EOS
        pairs.append([n_source] if len(source_ids) > n_source else [])
    return Alignment(text_alignment.cost, pairs, [])


class AlignStage:
    """Moves one source's top-k into target ids (reference §4), then drops its raw columns."""

    def __init__(self, name: str, bridge: VocabBridge, align: AlignConfig):
        self.name, self.bridge, self.align = name, bridge, align
        self.mode = "soft" if align.vocab_map == "mined" else "hard"
        self.fallback = "current" if align.mode == "reference" else "next"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raw = {
            k: batch.pop(f"{self.name}.raw_{k}")
            for k in ("ids", "offsets", "topk_ids", "topk_logits", "lse")
        }
        out_ids, out_logits, out_aligned, out_tail = [], [], [], []
        for row in range(len(batch["id"])):
            alignment = align_row(
                self.bridge,
                self.align,
                batch["input_ids"][row],
                batch["offsets"][row],
                raw["ids"][row],
                raw["offsets"][row],
                batch["text"][row],
            )
            moved = self.bridge.transfer(
                batch["input_ids"][row],
                raw["ids"][row],
                raw["topk_ids"][row],
                raw["topk_logits"][row],
                alignment,
                mode=self.mode,
                fallback=self.fallback,
                check_tokens=self.align.method == "dtw",
            )
            out_ids.append(moved.ids)
            out_logits.append(moved.logits.astype(np.float32))
            out_aligned.append(moved.aligned)
            out_tail.append(moved_tail(moved.logits, moved.aligned, alignment, raw["lse"][row]))
        batch[f"{self.name}.topk_ids"] = object_array(out_ids)
        batch[f"{self.name}.topk_logits"] = object_array(out_logits)
        batch[f"{self.name}.aligned"] = object_array(out_aligned)
        batch[f"{self.name}.tail"] = object_array(out_tail)
        return batch


def moved_tail(
    logits: np.ndarray, aligned: np.ndarray, alignment: Alignment, source_lse: np.ndarray
) -> np.ndarray:
    """Per target position, the source's probability outside what the transfer kept: its
    own tail plus the top-k entries the vocabulary map dropped (0 where the position holds a
    fallback or nothing)."""
    tail = np.zeros(len(aligned), dtype=np.float32)
    rows = np.flatnonzero(aligned)
    if rows.size:
        sources = np.asarray([alignment.target_to_source[i][0] for i in rows])
        tail[rows] = tail_mass(logits[rows], np.asarray(source_lse)[sources])
    return tail


def fuse_batch(
    batch: dict[str, np.ndarray],
    candidates: list[str],
    fuse: FuseConfig,
    mode: str,
    vocab_size: int,
) -> dict[str, np.ndarray]:
    """Fuse the candidates' aligned top-k per row into ``fused.*`` (MinCE or AvgCE).

    The one-hot of a position no candidate can teach is on the next token in clean mode and
    on the current token in reference mode, as the transfer's fallback is. ``vocab_size`` is
    the target's (the 'window' and 'prefix' rules score stored distributions, tails included).
    """
    fused_ids, fused_logits, choices, tails = [], [], [], []
    for row in range(len(batch["id"])):
        input_ids = np.asarray(batch["input_ids"][row], np.int64)
        ids = np.stack([batch[f"{c}.topk_ids"][row] for c in candidates])
        # the values as stored (float16): a `fusion refuse` of the data set fuses the same
        logits = as_stored(np.stack([batch[f"{c}.topk_logits"][row] for c in candidates]))
        stored_tails = as_stored(np.stack([batch[f"{c}.tail"][row] for c in candidates]))
        aligned = np.stack([candidate_aligned(batch, c, row) for c in candidates])
        labels = next_tokens(input_ids)
        if fuse.granularity == "token":
            ce = np.stack([topk_token_ce(i, lg, labels) for i, lg in zip(ids, logits, strict=True)])
        elif fuse.granularity in ("window", "prefix"):
            nll = np.stack(
                [
                    label_nll(i, lg, tail, labels, vocab_size)
                    for i, lg, tail in zip(ids, logits, stored_tails, strict=True)
                ]
            )
            nll[~aligned] = np.nan
            ce = local_ce(nll, fuse.window, causal=fuse.granularity == "prefix")
        elif fuse.per_byte(mode):
            size = max(len(str(batch["text"][row]).encode("utf-8")), 1)
            ce = np.asarray([batch[f"{c}.nll"][row] / size for c in candidates], np.float64)
        else:
            ce = np.asarray([batch[f"{c}.ce"][row] for c in candidates], dtype=np.float64)
        result = fuse_topk(
            ids,
            logits,
            ce,
            method=fuse.method,
            mode=mode,
            aligned=aligned,
            fallback_ids=labels if mode == "clean" else input_ids,
            no_teacher=fuse.no_teacher,
            tails=stored_tails,
        )
        fused_ids.append(result.ids)
        fused_logits.append(result.logits.astype(np.float32))
        choices.append(result.choice)
        tails.append(result.tail.astype(np.float32))
    batch[f"{FUSED}.topk_ids"] = object_array(fused_ids)
    batch[f"{FUSED}.topk_logits"] = object_array(fused_logits)
    batch[f"{FUSED}.choice"] = object_array(choices)
    batch[f"{FUSED}.tail"] = object_array(tails)
    return batch


def write_batch(
    batch: dict[str, np.ndarray],
    out_dir: str,
    table_schema,
    top_k: int,
    candidates: list[str],
    vocab_size: int,
) -> dict[str, np.ndarray]:
    """Write the batch as one committed part (with its teacher counts over a target
    vocabulary of ``vocab_size``); return one summary row for the driver."""
    counts = teacher_counts(batch, candidates, vocab_size)
    table = to_table(batch, table_schema, top_k)
    shards = [int(s) for s in batch["shard"]]
    totals = {int(s): int(t) for s, t in zip(batch["shard"], batch["shard_total"], strict=True)}
    sidecar = OutputDir(out_dir).write_part(table, shards, totals, teacher_counts=counts)
    written = {s: [len(ids), totals[int(s)]] for s, ids in sidecar["ids"].items()}
    return {
        "file": np.asarray([sidecar["file"]], dtype=object),
        "rows": np.asarray([sidecar["rows"]]),
        "tokens": np.asarray([sidecar["tokens"]]),
        "shards": np.asarray([json.dumps(written)], dtype=object),
    }
