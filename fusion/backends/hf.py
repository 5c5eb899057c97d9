"""The transformers backend: one causal LM, batched forward passes, top-k per position."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fusion.chunking import encode
from fusion.config import ModelConfig
from fusion.errors import FusionError
from fusion.models import load_causal_lm, load_tokenizer, resolve_device, vocab_list


class ModelOutputError(FusionError):
    """A model whose output cannot be used: NaN or infinite logits, or too few of them."""


@dataclass(frozen=True)
class TopK:
    """A model's reading of one sequence: top-k per position and the mean next-token CE."""

    ids: np.ndarray  # int32 [L, k]
    logits: np.ndarray  # float32 [L, k], highest first
    ce: float


class HFTopK:
    """Holds one model and its tokenizer; ``read`` returns top-k for a batch of texts.

    Ids the tokenizer does not know (embedding matrices padded beyond ``len(tokenizer)``, or
    holes in the vocabulary) are never emitted: their logits are masked before the top-k.
    """

    def __init__(self, model: ModelConfig, field: str, *, num_gpus: float, top_k: int):
        self.field = field
        self.top_k = top_k
        self.tokenizer = load_tokenizer(model.path, trust_remote_code=model.trust_remote_code)
        self.vocab = vocab_list(self.tokenizer)
        self.device = resolve_device(model, num_gpus)
        self.model = load_causal_lm(model, field, self.device)
        size = self.model.get_output_embeddings().weight.shape[0]
        if size < len(self.vocab):
            raise ModelOutputError(
                f"{field}: the model has {size} output logits but its tokenizer {len(self.vocab)} "
                "tokens; tokenizer and weights do not belong together"
            )
        usable = torch.zeros(size, dtype=torch.bool)
        usable[: len(self.vocab)] = True
        for token_id, token in enumerate(self.vocab):
            if token.startswith("<|fusion:unused:"):
                usable[token_id] = False
        self.masked = (~usable).to(self.device)
        self.max_length = getattr(self.model.config, "max_position_embeddings", None)

    def encode(self, text: str, has_eos: bool) -> tuple[np.ndarray, np.ndarray]:
        """This model's token ids (EOS appended when asked) and character offsets."""
        ids, offsets = encode(self.tokenizer, text, has_eos)
        if self.max_length and len(ids) > self.max_length:
            ids, offsets = ids[: self.max_length], offsets[: self.max_length]
        return ids, offsets

    @torch.inference_mode()
    def read(self, sequences: list[np.ndarray], row_ids: list[str]) -> list[TopK]:
        """Top-k and CE for each id sequence (right-padded into one forward pass)."""
        longest = max(len(s) for s in sequences)
        batch = torch.zeros(len(sequences), longest, dtype=torch.long)
        mask = torch.zeros(len(sequences), longest, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            batch[row, : len(sequence)] = torch.from_numpy(sequence.astype(np.int64))
            mask[row, : len(sequence)] = 1
        logits = self.model(batch.to(self.device), attention_mask=mask.to(self.device)).logits
        logits = logits.float().masked_fill(self.masked, float("-inf"))
        results = []
        for row, sequence in enumerate(sequences):
            length = len(sequence)
            row_logits = logits[row, :length]
            if not torch.isfinite(row_logits.max(-1).values).all():  # NaN or +inf anywhere
                raise ModelOutputError(
                    f"{self.field} produced NaN or infinite logits for row {row_ids[row]!r}"
                )
            values, indices = row_logits.topk(min(self.top_k, row_logits.shape[-1]), dim=-1)
            labels = batch[row, 1:length].to(self.device)
            # A one-token reading predicts nothing: no evidence, so it never wins MinCE.
            ce = (
                torch.nn.functional.cross_entropy(row_logits[:-1], labels).item()
                if length > 1
                else float("inf")
            )
            results.append(TopK(indices.int().cpu().numpy(), values.cpu().numpy(), float(ce)))
        return results
