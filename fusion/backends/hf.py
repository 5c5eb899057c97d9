"""The transformers backend: one causal LM, batched forward passes, top-k per position."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fusion.align.projection import ByteProjection, PositionPlan
from fusion.chunking import encode_for_reading
from fusion.config import ModelConfig
from fusion.errors import FusionError
from fusion.head import ChunkedHead
from fusion.models import (
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


def tail_mass(values: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """``1 - Σ_k softmax`` per position from top-k logits ``[L, k]`` and log-normalisers
    ``[L]`` (never below 0)."""
    kept = np.exp(values.astype(np.float64) - lse.astype(np.float64)[:, None]).sum(-1)
    return np.clip(1.0 - kept, 0.0, 1.0).astype(np.float32)


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
        head runs a few positions at a time (:class:`~fusion.head.ChunkedHead`): the batch's
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
        return [
            Projected(*collect.result(row), ce, nll)
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
    """Collects, chunk by chunk of head logits, the projected distributions a batch's plans
    ask for: the rows of each chunk that some target position reads are turned into
    probabilities, projected and cut to the top-k at once."""

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

    def visit(self, start: int, logits: torch.Tensor, lse: torch.Tensor) -> None:
        stop = start + logits.shape[1]
        asked = [
            (row, np.flatnonzero((plan.read_index >= start) & (plan.read_index < stop)))
            for row, plan in enumerate(self.plans)
        ]
        rows = np.concatenate([np.full(len(wanted), row) for row, wanted in asked])
        if not len(rows):
            return
        owners = np.concatenate([wanted for _, wanted in asked])
        columns = np.concatenate([self.plans[r].read_index[w] - start for r, w in asked])

        def field(name: str) -> np.ndarray:
            return np.concatenate([getattr(self.plans[r], name)[w] for r, w in asked])

        at = (
            torch.as_tensor(rows, device=logits.device),
            torch.as_tensor(columns, device=logits.device),
        )
        probs = torch.exp(logits[at] - lse[at][:, None])
        target = self.projection.project(
            probs, field("prefix"), field("lo"), field("hi"), field("at_start")
        )
        k = min(self.top_k, target.shape[1])
        values, indices = target.topk(k, dim=-1)
        values, indices = values.double().cpu().numpy(), indices.int().cpu().numpy()
        present = values > 0
        for slot, (row, owner) in enumerate(zip(rows.tolist(), owners.tolist(), strict=True)):
            if not present[slot, 0]:
                continue  # nothing in the source is consistent with the target's cut here
            ids, logprobs, tail, aligned = self.out[row]
            kept = present[slot]
            ids[owner, :k] = np.where(kept, indices[slot], -1)
            with np.errstate(divide="ignore"):
                logprobs[owner, :k] = np.log(np.where(kept, values[slot], 0.0))
            tail[owner] = max(0.0, 1.0 - values[slot].sum())
            aligned[owner] = True

    def result(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.out[row]
