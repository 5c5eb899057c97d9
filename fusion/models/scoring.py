"""Bits per byte and perplexity of causal LMs (or ensembles) on texts: what `fusion eval`
reports and what training measures on its held-out corpora.

Bits per byte divides a text's total negative log-likelihood by its UTF-8 size, so models with
different tokenizers are compared on the same footing; perplexity is per token of the model's
own tokenizer. Every window of a document starts with the tokenizer's BOS (or EOS when it has
no BOS, as GPT-2 style evaluations do), so every byte is predicted. A document longer than a
window is scored in consecutive windows without overlap. The average over domains is the
unweighted mean, so a large domain does not drown a small one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fusion.config import DataConfig
from fusion.data.corpus import plan_shards, read_documents
from fusion.errors import FusionError
from fusion.models.head import ChunkedHead


class EvalError(FusionError):
    """An evaluation that cannot run as asked (models, corpora or their combination)."""


@dataclass(frozen=True)
class Score:
    """A model's summed negative log-likelihood over a corpus, and what it covered; per
    document, its NLL and UTF-8 bytes (what a paired bootstrap resamples)."""

    nll: float
    tokens: int
    bytes: int
    document_nll: tuple[float, ...] = ()
    document_bytes: tuple[int, ...] = ()

    @property
    def bpb(self) -> float:
        return self.nll / math.log(2) / self.bytes

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)


def read_texts(path: str) -> list[str]:
    """The documents of a corpus file or folder (text, JSONL with ``text``, Parquet)."""
    data = DataConfig(paths=[path])
    texts = [doc.text for shard in plan_shards(data) for doc in read_documents(shard, data)]
    texts = [text for text in texts if text]
    if not texts:
        raise EvalError(f"{path}: holds no non-empty document to evaluate on")
    return texts


def _prefix_id(tokenizer) -> int:
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise EvalError(
        f"tokenizer {tokenizer.name_or_path!r} has neither a BOS nor an EOS token to start "
        "windows with"
    )


def windows(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Each text's token ids cut into windows of ``max_length``, each starting with BOS."""
    return [window for _, window in _numbered_windows(tokenizer, texts, max_length)]


def _numbered_windows(tokenizer, texts: Sequence[str], max_length: int):
    """:func:`windows`, each with the index of the text it comes from."""
    prefix, step = _prefix_id(tokenizer), max_length - 1
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [
        (index, [prefix, *ids[i : i + step]])
        for index, ids in enumerate(encoded)
        for i in range(0, len(ids), step)
    ]


@torch.no_grad()
def score(
    models: Sequence[torch.nn.Module],
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int = 1024,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> Score:
    """Score ``texts`` with one model, or an ensemble averaging the models' probabilities;
    ``on_batch`` hears the tokens of every batch scored."""
    device = next(models[0].parameters()).device
    heads = [ChunkedHead(model, masked=None) for model in models]
    numbered = sorted(_numbered_windows(tokenizer, texts, max_length), key=lambda w: len(w[1]))
    pieces = [window for _, window in numbered]
    per_document = torch.zeros(len(texts), dtype=torch.float64, device="cpu")
    tokens = 0
    for start in range(0, len(pieces), batch_size):
        batch = pieces[start : start + batch_size]
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long, device="cpu")  # built here,
        mask = torch.zeros(len(batch), width, dtype=torch.long, device="cpu")  # then moved
        for row, piece in enumerate(batch):
            ids[row, : len(piece)] = torch.tensor(piece, device="cpu")
            mask[row, : len(piece)] = 1
        ids, mask = ids.to(device), mask.to(device)
        per_model = []
        for head in heads:  # the label's log-probability, never a [B, L, V] log-softmax
            reading = head.read(ids, mask, top_k=1)
            per_model.append((reading.label_logit - reading.lse)[:, :-1])
        log_probs = torch.logsumexp(torch.stack(per_model), dim=0) - math.log(len(models))
        real = mask[:, 1:].bool()
        owners = torch.tensor(
            [index for index, _ in numbered[start : start + batch_size]], device="cpu"
        )
        window_nll = -torch.where(real, log_probs.double(), 0.0).sum(-1).cpu()
        per_document.index_add_(0, owners, window_nll)
        tokens += int(real.sum())
        if on_batch is not None:
            on_batch(int(real.sum()))
    sizes = tuple(len(text.encode("utf-8")) for text in texts)
    return Score(
        nll=float(per_document.sum()),
        tokens=tokens,
        bytes=sum(sizes),
        document_nll=tuple(per_document.tolist()),
        document_bytes=sizes,
    )


def summarise(scores: Mapping[str, Score], *, documents: bool = False) -> dict:
    """The report entry of one model: bpb and perplexity per domain, and average bpb; with
    ``documents``, each domain's per-document NLL (nats) and bytes too."""
    bpb = {domain: round(s.bpb, 5) for domain, s in scores.items()}
    entry = {
        "bpb": bpb,
        "perplexity": {domain: round(s.perplexity, 4) for domain, s in scores.items()},
        "avg_bpb": round(sum(bpb.values()) / len(bpb), 5),
    }
    if documents:
        entry["documents"] = {
            domain: {"nll": list(s.document_nll), "bytes": list(s.document_bytes)}
            for domain, s in scores.items()
        }
    return entry
