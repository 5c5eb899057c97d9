"""A causal LM's output head applied chunk by chunk: what is stored, never ``[B, L, V]`` logits.

At a 262k vocabulary one 8 × 2048 batch has 17 GB of float32 logits; the pipeline keeps only
the top-k, the log-normaliser and the label's logit per position. So the model's body runs
once, and its output head runs over a few positions at a time: peak extra memory is
O(chunk × V), whatever B × L is. Models whose logits are more than ``head(hidden)`` (a final
soft-cap is applied here; anything else is caught by a check at load time) fall back to the
dense logits, reduced the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Called with each chunk's first position, its masked float32 logits [B, n, V] and their
# log-normaliser [B, n]: work that needs whole rows of logits (a projection) happens there.
ChunkVisitor = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class HeadReading:
    """Per position: top-k ``values``/``indices`` ``[B, L, k]``, the log-normaliser ``lse``
    ``[B, L]`` and the logit of the next token ``label_logit`` ``[B, L]`` (last: undefined)."""

    values: torch.Tensor
    indices: torch.Tensor
    lse: torch.Tensor
    label_logit: torch.Tensor


def _softcap(model: torch.nn.Module) -> float | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    return getattr(config or model.config, "final_logit_softcapping", None)


class ChunkedHead:
    """Reads top-k, log-normaliser and label logits from a causal LM in bounded memory."""

    def __init__(
        self, model: torch.nn.Module, *, masked: torch.Tensor | None, budget_mb: int = 256
    ):
        self.model = model
        self.head = model.get_output_embeddings()
        self.body = model.base_model if model.base_model is not model else None
        self.softcap = _softcap(model)
        self.masked = masked if masked is not None and bool(masked.any()) else None
        self.budget = budget_mb * 2**20
        self.chunked = self.body is not None and self.head is not None and self._agrees()

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.inference_mode()
    def _agrees(self) -> bool:
        """Whether ``head(body(x))`` gives the model's own logits (checked on 8 tokens)."""
        device = next(self.model.parameters()).device
        ids = torch.arange(8, device=device)[None, :] % self.head.weight.shape[0]
        dense = self.model(ids).logits.float()
        chunked = self._logits(self.body(ids).last_hidden_state)
        return chunked.shape == dense.shape and torch.allclose(chunked, dense, rtol=1e-3, atol=1e-3)

    @torch.inference_mode()
    def read(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor,
        top_k: int,
        *,
        visit: ChunkVisitor | None = None,
        share: int = 1,
    ) -> HeadReading:
        """Top-k, log-normaliser and label logit at every position of a right-padded batch;
        ``visit`` sees every chunk's logits, which then take 1/``share`` of the budget."""
        batch, length = ids.shape
        if self.chunked:
            hidden = self.body(ids, attention_mask=attention_mask).last_hidden_state
            produce = self._logits
        else:
            hidden = self.model(ids, attention_mask=attention_mask).logits
            produce = torch.Tensor.float
        vocab = self.head.weight.shape[0] if self.head is not None else hidden.shape[-1]
        step = max(1, self.budget // max(1, 4 * batch * vocab * share))
        labels = torch.nn.functional.pad(ids[:, 1:], (0, 1))
        parts: list[tuple[torch.Tensor, ...]] = []
        for start in range(0, length, step):
            logits = produce(hidden[:, start : start + step])
            if self.masked is not None:
                logits.masked_fill_(self.masked, float("-inf"))
            values, indices = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
            lse = torch.logsumexp(logits, -1)
            label = logits.gather(-1, labels[:, start : start + step, None]).squeeze(-1)
            parts.append((values, indices, lse, label))
            if visit is not None:
                visit(start, logits, lse)
            del logits
        values, indices, lse, label = (torch.cat(p, dim=1) for p in zip(*parts, strict=True))
        return HeadReading(values, indices, lse, label)
