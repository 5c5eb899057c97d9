"""A benchmark-only source: a model that takes a fixed time per token and computes nothing.

It stands in for a GPU model in `bench/scale.py`: each ``read`` waits tokens / speed seconds
(a wait, not work, so the CPU stays free for the pipeline's own stages) and returns valid
top-k in the tokenizer's vocabulary: the next token first, then fixed other ids, with
falling logits. What it measures is the pipeline around the model, never the model.
"""

from __future__ import annotations

import time

import numpy as np

from fusion.config import SourceConfig
from fusion.data.chunking import encode_for_reading
from fusion.models.loading import model_tokenizer, reading_bos
from fusion.teacher.backends.hf import TopK


class SimulatedTopK:
    """The reader interface of :class:`~fusion.teacher.backends.hf.HFTopK`, at a configured
    speed."""

    def __init__(
        self, model: SourceConfig, field: str, *, num_gpus: float, top_k: int, read_bos: bool
    ):
        del num_gpus  # nothing is placed anywhere
        self.tokens_per_s = model.simulated_tokens_per_s
        self.top_k = top_k
        self.tokenizer = model_tokenizer(model)
        self.bos = reading_bos(self.tokenizer, model, field, read_bos)
        self.vocab_size = len(self.tokenizer)
        self.max_length = model.max_length
        self.logits = -np.arange(top_k, dtype=np.float32)  # top-1 .. top-k, falling
        self.lse = float(np.log(np.exp(self.logits).sum()))  # the top-k is the whole distribution
        self.label_nll = self.lse - float(self.logits[0])

    def encode(self, text: str, has_eos: bool) -> tuple[np.ndarray, np.ndarray]:
        return encode_for_reading(self.tokenizer, text, has_eos, self.max_length, self.bos)

    def read(self, sequences: list[np.ndarray], row_ids: list[str]) -> list[TopK]:
        del row_ids
        tokens = sum(len(s) + (self.bos is not None) for s in sequences)
        time.sleep(tokens / self.tokens_per_s)
        return [self._reading(np.asarray(s, dtype=np.int64)) for s in sequences]

    def _reading(self, sequence: np.ndarray) -> TopK:
        length = len(sequence)
        following = np.append(sequence[1:], sequence[-1] if length else 0)
        offsets = np.arange(self.top_k, dtype=np.int64)
        ids = (following[:, None] + offsets[None, :] * 7919) % self.vocab_size
        nll = self.label_nll * (length - 1)
        return TopK(
            ids.astype(np.int32),
            np.broadcast_to(self.logits, (length, self.top_k)).copy(),
            self.label_nll if length > 1 else float("inf"),
            nll if length > 1 else float("inf"),
            np.full(length, self.lse, dtype=np.float32),
        )
