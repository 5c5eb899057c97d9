"""The transformers backend: one causal LM, batched forward passes, top-k per position."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

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
    """A model's reading of one sequence: top-k per position, the mean next-token CE and the
    total next-token NLL (nats) in the model's own tokenization."""

    ids: np.ndarray  # int32 [L, k]
    logits: np.ndarray  # float32 [L, k], highest first
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
        head runs a few positions at a time (:class:`~fusion.head.ChunkedHead`): the batch's
        ``[B, L, V]`` logits never exist at once. The NaN check reads the top-1 values."""
        first = int(self.bos is not None)  # a BOS read first is dropped from every output
        lengths = torch.tensor([len(s) + first for s in sequences])
        # CPU kernels sum a short padded width in another order than a long one; from
        # MIN_WIDTH on, a row's logits no longer depend on the batch it was padded into.
        width = max(int(lengths.max()), min(MIN_WIDTH, self.max_length or MIN_WIDTH))
        batch = torch.zeros(len(sequences), width, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            if first:
                batch[row, 0] = self.bos
            batch[row, first : lengths[row]] = torch.from_numpy(sequence.astype(np.int64))
        positions = torch.arange(batch.shape[1])
        real = positions[None, :] < lengths[:, None]
        batch, real = batch.to(self.device), real.to(self.device)
        reading = self.head.read(batch, real.long(), self.top_k)
        values, indices = reading.values, reading.indices
        finite = torch.isfinite(values[..., 0]) | ~real  # NaN sorts first, +inf is the max
        if not finite.all():
            row = int((~finite).any(-1).nonzero()[0])
            raise ModelOutputError(
                f"{self.field} produced NaN or infinite logits for row {row_ids[row]!r}"
            )
        # Per-position NLL of the next token; each row sums only its own positions, so the
        # padding a batch adds never changes the sum's order.
        nll = (reading.lse[:, :-1] - reading.label_logit[:, :-1]).cpu()
        values, indices = values.cpu().numpy(), indices.int().cpu().numpy()
        # A one-token reading predicts nothing: no evidence, so it never wins MinCE.
        readings = []
        for row, length in enumerate(lengths.tolist()):
            text_nll = nll[row, first : length - 1]  # predictions of the chunk's own tokens
            readings.append(
                TopK(
                    indices[row, first:length],
                    values[row, first:length],
                    float(text_nll.mean()) if len(text_nll) else float("inf"),
                    float(text_nll.sum()) if len(text_nll) else float("inf"),
                )
            )
        return readings
