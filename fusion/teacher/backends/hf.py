"""The transformers backend: one causal LM, batched forward passes, top-k per position."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fusion.align.projection import ByteProjection, PositionPlan, along_the_text
from fusion.config import ModelConfig
from fusion.data.chunking import encode_for_reading
from fusion.errors import FusionError
from fusion.models.head import ChunkedHead
from fusion.models.loading import (
    UNUSED_PREFIX,
    load_causal_lm,
    model_tokenizer,
    reading_bos,
    resolve_device,
    vocab_list,
)

MIN_WIDTH = 64  # positions every batch is padded to at least (see HFTopK.read)


class ModelOutputError(FusionError):
    """A model whose output cannot be used: NaN or infinite logits, or too few of them."""


@dataclass(frozen=True)
class TopK:
    """A model's reading of one sequence: top-k per position with its log-normaliser (the
    mass outside the top-k is ``tail_mass(logits, lse)``), the mean next-token CE and the
    total next-token NLL (nats) in the model's own tokenization."""

    ids: np.ndarray  # int32 [L, k]
    logits: np.ndarray  # float32 [L, k], highest first
    ce: float
    nll: float
    lse: np.ndarray  # float32 [L]: log-normaliser of the logits (0 for log-probabilities)


@dataclass(frozen=True)
class Projected:
    """A source's reading of one chunk projected into target ids, per target text position
    (:mod:`fusion.align.projection`): top-k log-probabilities, the mass outside them, where a
    teacher exists; and the source's own mean CE and NLL, as :class:`TopK` has them."""

    ids: np.ndarray  # int32 [n, k], -1 unused
    logits: np.ndarray  # float32 [n, k], log-probabilities, -inf unused
    tail: np.ndarray  # float32 [n]
    aligned: np.ndarray  # bool [n]
    ce: float
    nll: float


class HFTopK:
    """Holds one model and its tokenizer; ``read`` returns top-k for a batch of texts.

    Ids the tokenizer does not know (embedding matrices padded beyond ``len(tokenizer)``, or
    holes in the vocabulary) are never emitted: their logits are masked before the top-k.
    """

    def __init__(
        self,
        model: ModelConfig,
        field: str,
        *,
        num_gpus: float,
        top_k: int,
        read_bos: bool = False,
    ):
        self.field = field
        self.top_k = top_k
        self.tokenizer = model_tokenizer(model)
        self.bos = reading_bos(self.tokenizer, model, field, read_bos)
        self.vocab = vocab_list(self.tokenizer)
        device = resolve_device(model, num_gpus)
        self.model = load_causal_lm(model, field, device, num_gpus=num_gpus)
        self.device = self.model.get_input_embeddings().weight.device  # first of its GPUs
        head_device = self.model.get_output_embeddings().weight.device
        size = self.model.get_output_embeddings().weight.shape[0]
        if size < len(self.vocab):
            raise ModelOutputError(
                f"{field}: the model has {size} output logits but its tokenizer {len(self.vocab)} "
                "tokens; tokenizer and weights do not belong together"
            )
        usable = torch.zeros(size, dtype=torch.bool, device="cpu")
        usable[: len(self.vocab)] = True
        for token_id, token in enumerate(self.vocab):
            if token.startswith(UNUSED_PREFIX):
                usable[token_id] = False
        self.head = ChunkedHead(
            self.model, masked=(~usable).to(head_device), budget_mb=model.logits_budget_mb
        )
        self.max_length = getattr(model, "max_length", None) or getattr(
            self.model.config, "max_position_embeddings", None
        )

    def encode(self, text: str, has_eos: bool) -> tuple[np.ndarray, np.ndarray]:
        """This model's token ids (EOS appended when asked) and character offsets."""
        return encode_for_reading(self.tokenizer, text, has_eos, self.max_length, self.bos)

    @torch.inference_mode()
    def read(self, sequences: list[np.ndarray], row_ids: list[str]) -> list[TopK]:
        """Top-k and CE for each id sequence, from one right-padded forward pass whose output
        head runs a few positions at a time (:class:`~fusion.models.head.ChunkedHead`): the batch's
        ``[B, L, V]`` logits never exist at once. The NaN check reads the top-1 values."""
        reading, lengths = self._read(sequences, row_ids, None)
        first = int(self.bos is not None)  # a BOS read first is dropped from every output
        values, indices = reading.values.cpu().numpy(), reading.indices.int().cpu().numpy()
        lse = reading.lse.cpu().numpy()
        readings = []
        for row, (length, (ce, nll)) in enumerate(
            zip(lengths, self._nll(reading, lengths), strict=True)
        ):
            kept = slice(first, length)
            readings.append(TopK(indices[row, kept], values[row, kept], ce, nll, lse[row, kept]))
        return readings

    @torch.inference_mode()
    def read_projected(
        self,
        sequences: list[np.ndarray],
        row_ids: list[str],
        plans: list[PositionPlan],
        projection: ByteProjection,
    ) -> list[Projected]:
        """Each sequence's full next-token distributions projected into target ids at the
        positions its plan names, chunk by chunk inside the head's budget; CE as :meth:`read`."""
        collect = _Projector(projection, plans, self.top_k)
        reading, lengths = self._read(sequences, row_ids, collect)
        actual = torch.exp(reading.label_logit - reading.lse).double().cpu().numpy()
        return [
            Projected(*collect.result(row, actual[row]), ce, nll)
            for row, (ce, nll) in enumerate(self._nll(reading, lengths))
        ]

    def _read(self, sequences, row_ids, visitor):
        """One right-padded forward pass through the chunked head (``visitor`` sees every
        chunk of logits); the reading and each row's length as read (its BOS included)."""
        first = int(self.bos is not None)
        lengths = [len(s) + first for s in sequences]
        # CPU kernels sum a short padded width in another order than a long one; from
        # MIN_WIDTH on, a row's logits no longer depend on the batch it was padded into.
        width = max(max(lengths), min(MIN_WIDTH, self.max_length or MIN_WIDTH))
        batch = torch.zeros(len(sequences), width, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            if first:
                batch[row, 0] = self.bos
            batch[row, first : lengths[row]] = torch.from_numpy(sequence.astype(np.int64))
        positions = torch.arange(batch.shape[1])
        real = positions[None, :] < torch.tensor(lengths)[:, None]
        batch, real = batch.to(self.device), real.to(self.device)
        reading = self.head.read(
            batch,
            real.long(),
            self.top_k,
            visit=None if visitor is None else visitor.visit,
            share=1 if visitor is None else _Projector.SHARE,
        )
        finite = torch.isfinite(reading.values[..., 0]) | ~real  # NaN sorts first, +inf the max
        if not finite.all():
            row = int((~finite).any(-1).nonzero()[0])
            raise ModelOutputError(
                f"{self.field} produced NaN or infinite logits for row {row_ids[row]!r}"
            )
        return reading, lengths

    def _nll(self, reading, lengths: list[int]) -> list[tuple[float, float]]:
        """Per row, the mean and total NLL of the chunk's own tokens. Each row sums only its
        own positions, so the padding a batch adds never changes the sum's order; a one-token
        reading predicts nothing: no evidence, so it never wins MinCE."""
        first = int(self.bos is not None)
        nll = (reading.lse[:, :-1] - reading.label_logit[:, :-1]).cpu()
        out = []
        for row, length in enumerate(lengths):
            text_nll = nll[row, first : length - 1]  # predictions of the chunk's own tokens
            if len(text_nll):
                out.append((float(text_nll.mean()), float(text_nll.sum())))
            else:
                out.append((float("inf"), float("inf")))
        return out


class _Projector:
    """Collects, chunk by chunk of head logits, what a batch's plans ask for: the rows of each
    chunk that some target position reads are turned into probabilities, projected and cut to
    the top-k at once; positions whose target token runs past the source's token keep a little
    more (top-k + 1, their label's and short cut's values, the mass before renormalising) until
    the probabilities along the text are read (:func:`~fusion.align.projection.along_the_text`)."""

    SHARE = 3  # logits, the probabilities of the rows read, and their target-space sums

    def __init__(self, projection: ByteProjection, plans: list[PositionPlan], top_k: int):
        self.projection, self.plans, self.top_k = projection, plans, top_k
        self.out = [
            (
                np.full((len(p.read_index), top_k), -1, dtype=np.int32),
                np.full((len(p.read_index), top_k), -np.inf, dtype=np.float32),
                np.zeros(len(p.read_index), dtype=np.float32),
                np.zeros(len(p.read_index), dtype=bool),
            )
            for p in plans
        ]
        self.pending: list[dict[int, tuple]] = [{} for _ in plans]
        self.spelled = [np.zeros(len(p.step_owner)) for p in plans]

    def visit(self, start: int, logits: torch.Tensor, lse: torch.Tensor) -> None:
        stop = start + logits.shape[1]
        device = logits.device

        def probabilities(reads: list[tuple[int, np.ndarray]]) -> torch.Tensor:
            rows = np.concatenate([np.full(len(r), row) for row, r in reads])
            columns = np.concatenate([r - start for _, r in reads])
            at = (torch.as_tensor(rows, device=device), torch.as_tensor(columns, device=device))
            return torch.exp(logits[at] - lse[at][:, None])

        steps = [
            (row, np.flatnonzero((plan.step_read >= start) & (plan.step_read < stop)))
            for row, plan in enumerate(self.plans)
        ]
        if sum(len(w) for _, w in steps):
            probs = probabilities([(r, self.plans[r].step_read[w]) for r, w in steps])
            lo = np.concatenate([self.plans[r].step_lo[w] for r, w in steps])
            hi = np.concatenate([self.plans[r].step_hi[w] for r, w in steps])
            mass = self.projection.spelled_mass(probs, lo, hi).double().cpu().numpy()
            offset = 0
            for row, wanted in steps:
                self.spelled[row][wanted] = mass[offset : offset + len(wanted)]
                offset += len(wanted)
        asked = [
            (row, np.flatnonzero((plan.read_index >= start) & (plan.read_index < stop)))
            for row, plan in enumerate(self.plans)
        ]
        rows = np.concatenate([np.full(len(wanted), row) for row, wanted in asked])
        if not len(rows):
            return
        owners = np.concatenate([wanted for _, wanted in asked])

        def field(name: str) -> np.ndarray:
            return np.concatenate([getattr(self.plans[r], name)[w] for r, w in asked])

        probs = probabilities([(r, self.plans[r].read_index[w]) for r, w in asked])
        target, total = self.projection.project(
            probs, field("prefix"), field("lo"), field("hi"), field("view")
        )
        labels, shorts = field("label"), field("short")
        k = min(self.top_k, target.shape[1])
        values, indices = target.topk(min(k + 1, target.shape[1]), dim=-1)
        values, indices = values.double().cpu().numpy(), indices.cpu().numpy()
        picked = np.flatnonzero(labels >= 0)
        index = torch.as_tensor(picked, device=device)
        at_label = target[index, torch.as_tensor(labels[picked], device=device)]
        at_short = target[index, torch.as_tensor(np.maximum(shorts[picked], 0), device=device)]
        at_label, at_short = at_label.double().cpu().numpy(), at_short.double().cpu().numpy()
        total = total[:, 0].double().cpu().numpy()
        for n, slot in enumerate(picked.tolist()):
            entries = dict(zip(indices[slot].tolist(), values[slot].tolist(), strict=True))
            entries[int(labels[slot])] = float(at_label[n])
            if shorts[slot] >= 0:
                entries[int(shorts[slot])] = float(at_short[n])
            row, owner = int(rows[slot]), int(owners[slot])
            self.pending[row][owner] = (
                entries,
                float(total[slot]),
                int(labels[slot]),
                int(shorts[slot]),
            )
        for slot, (row, owner) in enumerate(zip(rows.tolist(), owners.tolist(), strict=True)):
            if labels[slot] < 0:
                self._store(row, owner, indices[slot, :k], values[slot, :k])

    def _store(self, row: int, owner: int, ids: np.ndarray, values: np.ndarray) -> None:
        kept = values > 0
        if not kept.any():
            return  # nothing in the source is consistent with the target's cut here
        out_ids, logprobs, tail, aligned = self.out[row]
        n = len(ids)
        out_ids[owner, :n] = np.where(kept, ids, -1)
        with np.errstate(divide="ignore"):
            logprobs[owner, :n] = np.log(np.where(kept, values, 0.0))
        tail[owner] = max(0.0, 1.0 - values[kept].sum())
        aligned[owner] = True

    def result(
        self, row: int, actual: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One row's projection, its pending positions finished with ``actual`` (the
        probability at each read index of the text's next token)."""
        plan = self.plans[row]
        share = along_the_text(plan, self.spelled[row], actual)
        for owner, (entries, total, label, short) in self.pending[row].items():
            moved = actual[plan.read_index[owner]] * share[owner]  # of s*, along the text
            if short >= 0:  # s* taught its short cut: part of that mass moves to the label
                moved = min(moved / total, entries[short]) if total > 0 else 0.0
                entries[short] -= moved
                entries[label] += moved
            elif total + moved > 0:  # s* taught nothing: it teaches the label now
                entries = {i: v * total / (total + moved) for i, v in entries.items()}
                entries[label] += moved / (total + moved)
            ranked = sorted(entries.items(), key=lambda item: (-item[1], item[0]))[: self.top_k]
            self._store(
                row,
                owner,
                np.asarray([i for i, _ in ranked]),
                np.asarray([v for _, v in ranked]),
            )
        return self.out[row]
