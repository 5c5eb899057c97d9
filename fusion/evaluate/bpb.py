"""`fusion eval`: bits per byte and perplexity of local models, or of ensembles that average
their probabilities, on held-out corpora (the scoring itself is fusion.models.scoring).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from fusion.config import ModelConfig
from fusion.models.loading import load_causal_lm, model_tokenizer, vocab_fingerprint
from fusion.models.scoring import EvalError, read_texts, score, summarise, windows
from fusion.progress import Meter


def _load(name: str, path: str, device: str, dtype: str):
    config = ModelConfig(path=path, dtype=dtype)
    model = load_causal_lm(config, name, device, label=f"--model {name}")
    return model, model_tokenizer(config, name)


def evaluate(
    members: Mapping[str, Sequence[str]],
    corpora: Mapping[str, str],
    *,
    max_length: int = 1024,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "auto",
    echo: Callable[[str], None] | None = None,
    documents: bool = False,
) -> dict[str, dict]:
    """Per named model (one folder) or ensemble (several sharing a vocabulary): bpb and ppl;
    ``echo`` hears a progress line (tokens, rate, time left) every few seconds per model;
    ``documents`` adds each document's NLL and bytes (for paired verdicts).

    Returns ``{name: {"bpb": {domain: float}, "perplexity": {domain: float},
    "avg_bpb": float}}``.
    """
    from transformers.utils import logging

    if not corpora:
        raise EvalError("no corpus to evaluate on: give at least one DOMAIN=PATH")
    logging.disable_progress_bar()  # one bar per weight file drowns the results
    texts = {domain: read_texts(path) for domain, path in corpora.items()}
    results = {}
    for name, folders in members.items():
        if not folders:
            raise EvalError(f"{name}: names no model folder")
        loaded = [_load(name, folder, device, dtype) for folder in folders]
        tokenizer = loaded[0][1]
        vocabularies = {vocab_fingerprint(tok) for _, tok in loaded}
        if len(vocabularies) > 1:
            raise EvalError(
                f"{name}: an ensemble averages probabilities token by token, so its members "
                f"must share one vocabulary; {list(folders)} do not"
            )
        models = [model for model, _ in loaded]
        report = _Reporter(name, tokenizer, texts, max_length, echo)
        scores = {
            domain: score(
                models,
                tokenizer,
                domain_texts,
                max_length=max_length,
                batch_size=batch_size,
                on_batch=report,
            )
            for domain, domain_texts in texts.items()
        }
        report.finish()
        results[name] = summarise(scores, documents=documents)
    return results


class _Reporter:
    """Progress of one model's scoring: a line every few seconds and one at the end."""

    EVERY = 5.0  # seconds between lines

    def __init__(self, name, tokenizer, texts, max_length, echo):
        self.name, self.echo = name, echo
        every = [w for t in texts.values() for w in windows(tokenizer, t, max_length)]
        self.total = sum(len(window) - 1 for window in every) if echo else 0
        self.done, self.meter, self.last = 0, Meter(), time.perf_counter()

    def __call__(self, tokens: int) -> None:
        self.done += tokens
        if self.echo and time.perf_counter() - self.last >= self.EVERY:
            self.finish()

    def finish(self) -> None:
        if not self.echo:
            return
        self.last = time.perf_counter()
        rate = self.meter.line(self.done / max(self.total, 1), self.done - self.meter.count)
        self.echo(f"{self.name}: {self.done:,}/{self.total:,} tokens · {rate}")
