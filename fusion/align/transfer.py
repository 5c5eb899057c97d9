"""Move a source model's per-position top-k into the target vocabulary (reference §4).

A :class:`VocabBridge` holds the id tables of one (source, target) tokenizer pair and is built
once per pair; its :meth:`VocabBridge.transfer` is vectorised over positions. Results are
``[L, k]`` arrays padded with :data:`PAD_ID` and ``-inf``; :func:`transfer_topk` returns the
same as ragged lists, the reference's shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import numpy as np

from fusion.align.alignment import Alignment
from fusion.align.dtw import dtw_align
from fusion.align.markers import BYTE_LEVEL, SENTENCEPIECE, translate_marker
from fusion.align.vocab import mined_vocab_map, vocab_index

PAD_ID = -1
_ROLE_ORDER = {"eos": 0, "bos": 1, "unk": 3, "pad": 3}  # EOS wins where PAD shares its id
Mode = Literal["soft", "hard"]
Fallback = Literal["current", "next"]


def as_ids(name: str, values: object, vocab_size: int) -> np.ndarray:
    """Token ids as an int64 array, or ValueError if any id lies outside ``[0, vocab_size)``."""
    ids = np.asarray(values)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    outside = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if outside.size:
        where = np.unravel_index(outside[0], ids.shape)
        raise ValueError(
            f"{name}{list(map(int, where))} = {int(ids[where])} is outside the vocabulary "
            f"(size {vocab_size})"
        )
    return ids


def _first_wins(ids: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop unmapped entries and repeats of an earlier id per row; pack the rest to the left."""
    k = ids.shape[1]
    earlier = np.tril(np.ones((k, k), dtype=bool), -1)
    repeated = ((ids[:, :, None] == ids[:, None, :]) & earlier).any(axis=2)
    keep = (ids != PAD_ID) & ~repeated
    order = np.argsort(~keep, axis=1, kind="stable")
    keep = np.take_along_axis(keep, order, axis=1)
    ids = np.where(keep, np.take_along_axis(ids, order, axis=1), PAD_ID)
    logits = np.where(keep, np.take_along_axis(logits, order, axis=1), -np.inf)
    return ids, logits


class Transferred(NamedTuple):
    """A source's top-k in target ids ``[L, k]`` and which positions are its own (``[L]``)."""

    ids: np.ndarray
    logits: np.ndarray
    aligned: np.ndarray


@dataclass(frozen=True)
class VocabBridge:
    """Id tables from one source vocabulary into one target vocabulary.

    ``exact_ids[s]`` is the target id spelled like source token ``s`` (marker translated), or
    :data:`PAD_ID`; ``mapped_ids[s]`` the target id the vocabulary map sends it to.
    """

    source_vocab: list[str]
    target_vocab: list[str]
    mapping: Mapping[str, str]
    source_marker: str
    target_marker: str
    exact_ids: np.ndarray
    mapped_ids: np.ndarray

    @classmethod
    def build(
        cls,
        source_vocab: Sequence[str],
        target_vocab: Sequence[str],
        mapping: Mapping[str, str] | None = None,
        *,
        source_marker: str = BYTE_LEVEL,
        target_marker: str = SENTENCEPIECE,
    ) -> VocabBridge:
        """Build the tables; ``mapping=None`` computes the MinED map."""
        target_index = vocab_index(target_vocab, "target_vocab")
        vocab_index(source_vocab, "source_vocab")
        if mapping is None:
            mapping = mined_vocab_map(
                source_vocab, target_vocab, source_marker=source_marker, target_marker=target_marker
            )
        for key, value in mapping.items():
            if value not in target_index:
                raise ValueError(f"mapping[{key!r}] = {value!r} is not a target vocabulary token")
        translated = [translate_marker(t, source_marker, target_marker) for t in source_vocab]
        exact = [target_index.get(t, PAD_ID) for t in translated]
        mapped = [target_index[mapping[t]] if t in mapping else PAD_ID for t in translated]
        return cls(
            source_vocab=list(source_vocab),
            target_vocab=list(target_vocab),
            mapping=mapping,
            source_marker=source_marker,
            target_marker=target_marker,
            exact_ids=np.asarray(exact, dtype=np.int64),
            mapped_ids=np.asarray(mapped, dtype=np.int64),
        )

    def with_special_roles(
        self, source_specials: Mapping[str, int], target_specials: Mapping[str, int]
    ) -> VocabBridge:
        """The same bridge with special tokens mapped by role, not by spelling (clean mode).

        ``*_specials`` name each side's special ids by role (``bos``, ``eos``, ``unk``,
        ``pad``) and any other special token by its spelling. A source EOS goes to the target
        EOS, BOS to BOS, another special to the target special spelled the same; UNK, PAD and
        specials the target lacks go nowhere. No ordinary source token lands on a target
        special: MinED would otherwise send ``<|endoftext|>`` to whatever is spelled closest.
        """
        exact, mapped = self.exact_ids.copy(), self.mapped_ids.copy()
        target_special_ids = np.fromiter(target_specials.values(), dtype=np.int64)
        for table in (exact, mapped):
            table[np.isin(table, target_special_ids)] = PAD_ID
        assigned: set[int] = set()
        ordered = sorted(source_specials.items(), key=lambda item: _ROLE_ORDER.get(item[0], 2))
        for role, source_id in ordered:
            if source_id in assigned or not 0 <= source_id < len(self.source_vocab):
                continue
            assigned.add(source_id)
            by_role = role not in ("unk", "pad")
            exact[source_id] = mapped[source_id] = (
                target_specials.get(role, PAD_ID) if by_role else PAD_ID
            )
        return replace(self, exact_ids=exact, mapped_ids=mapped)

    def _first_position_agrees(self, target_id: int, source_id: int, mode: Mode) -> bool:
        """The token check at position 0, with the reference's SentencePiece dummy-prefix rule."""
        bt = self.target_vocab[target_id]
        st = translate_marker(self.source_vocab[source_id], self.source_marker, self.target_marker)
        if self.source_marker == BYTE_LEVEL and bt.startswith("▁") and not st.startswith("▁"):
            st = "▁" + st
        return bt == st or (mode == "soft" and self.mapping.get(st) == bt)

    def transfer(
        self,
        target_ids: Sequence[int] | np.ndarray,
        source_ids: Sequence[int] | np.ndarray,
        source_topk_ids: Sequence[Sequence[int]] | np.ndarray,
        source_topk_logits: Sequence[Sequence[float]] | np.ndarray,
        alignment: Alignment,
        *,
        mode: Mode = "soft",
        fallback: Fallback = "current",
        check_tokens: bool = True,
    ) -> Transferred:
        """Per target position, the aligned source top-k in target ids, else a one-hot.

        ``mode="hard"`` keeps only top-k tokens the target spells the same and aligns only
        identical tokens; ``"soft"`` goes through the vocabulary map. ``fallback`` puts the
        one-hot on the current target token (reference) or the next one (clean; the last
        position then has none). ``check_tokens=False`` trusts the alignment alone (offsets).
        Returns ``ids`` int32 ``[L, k]`` padded with PAD_ID, ``logits`` float64 with -inf, and
        ``aligned`` bool ``[L]``: the position carries this source's own distribution (false
        where it holds the one-hot fallback, or where no top-k entry survived the mapping).
        """
        if mode not in ("soft", "hard"):
            raise ValueError(f"mode must be 'soft' or 'hard', got {mode!r}")
        if fallback not in ("current", "next"):
            raise ValueError(f"fallback must be 'current' or 'next', got {fallback!r}")
        target = as_ids("target_ids", target_ids, len(self.target_vocab))
        source = as_ids("source_ids", source_ids, len(self.source_vocab))
        if target.ndim != 1 or source.ndim != 1 or not len(target) or not len(source):
            raise ValueError("target_ids and source_ids must be non-empty 1-D id sequences")
        topk_ids = as_ids("source_topk_ids", source_topk_ids, len(self.source_vocab))
        topk_logits = np.asarray(source_topk_logits, dtype=np.float64)
        if topk_ids.ndim != 2 or topk_ids.shape != (len(source), topk_ids.shape[1]):
            raise ValueError(
                f"source_topk_ids has shape {topk_ids.shape}; expected [len(source_ids)="
                f"{len(source)}, k]"
            )
        if topk_ids.shape[1] == 0:
            raise ValueError("source_topk_ids has k = 0 entries per position; k must be ≥ 1")
        if topk_logits.shape != topk_ids.shape:
            raise ValueError(
                f"source_topk_logits has shape {topk_logits.shape}, source_topk_ids "
                f"{topk_ids.shape}: they must match"
            )
        bad = np.flatnonzero(np.isnan(topk_logits) | (topk_logits == np.inf))
        if bad.size:
            row, col = np.unravel_index(bad[0], topk_logits.shape)
            raise ValueError(
                f"source_topk_logits[{row}][{col}] is {topk_logits[row, col]}: logits must be "
                "finite (or -inf for an impossible token)"
            )
        matched = alignment.target_to_source
        if len(matched) != len(target):
            raise ValueError(
                f"alignment covers {len(matched)} target positions but target_ids has {len(target)}"
            )
        single = np.full(len(target), -1, dtype=np.int64)
        for i, positions in enumerate(matched):
            for j in positions:
                if not 0 <= j < len(source):
                    raise ValueError(
                        f"alignment pairs target position {i} with source position {j}, but "
                        f"source_ids has {len(source)} positions"
                    )
            if len(positions) == 1:
                single[i] = positions[0]

        rows = np.flatnonzero(single >= 0)
        from_source = single[rows]
        if check_tokens and rows.size:
            src_tokens, tgt_tokens = source[from_source], target[rows]
            agrees = self.exact_ids[src_tokens] == tgt_tokens
            if mode == "soft":
                agrees |= self.mapped_ids[src_tokens] == tgt_tokens
            if rows[0] == 0:
                agrees[0] = self._first_position_agrees(int(target[0]), int(src_tokens[0]), mode)
            rows, from_source = rows[agrees], from_source[agrees]

        table = self.exact_ids if mode == "hard" else self.mapped_ids
        k = topk_ids.shape[1]
        ids = np.full((len(target), k), PAD_ID, dtype=np.int64)
        logits = np.full((len(target), k), -np.inf, dtype=np.float64)
        ids[rows], logits[rows] = _first_wins(
            table[topk_ids[from_source]], topk_logits[from_source]
        )

        one_hot = np.ones(len(target), dtype=bool)
        one_hot[rows] = False
        aligned = (ids != PAD_ID).any(axis=1) & ~one_hot
        if fallback == "next":
            one_hot[-1] = False
            label = np.roll(target, -1)
        else:
            label = target
        ids[one_hot, 0] = label[one_hot]
        logits[one_hot, 0] = 1.0
        return Transferred(ids.astype(np.int32), logits, aligned)


def transfer_topk(
    target_ids: Sequence[int],
    source_ids: Sequence[int],
    source_topk_ids: Sequence[Sequence[int]],
    source_topk_logits: Sequence[Sequence[float]],
    *,
    target_vocab: Sequence[str],
    source_vocab: Sequence[str],
    mapping: Mapping[str, str] | None = None,
    mode: Mode = "soft",
    source_marker: str = BYTE_LEVEL,
    target_marker: str = SENTENCEPIECE,
    fallback: Fallback = "current",
    alignment: Alignment | None = None,
    check_tokens: bool = True,
) -> tuple[list[list[int]], list[list[float]]]:
    """Reference §4 as ragged lists: per target position, target ids and their logits.

    ``mapping`` defaults to the MinED map (soft mode); ``alignment`` to :func:`dtw_align` of
    the two token-string sequences. For many sequences build a :class:`VocabBridge` once.
    """
    if mapping is None and mode == "soft":
        mapping = mined_vocab_map(
            source_vocab, target_vocab, source_marker=source_marker, target_marker=target_marker
        )
    bridge = VocabBridge.build(
        source_vocab,
        target_vocab,
        mapping or {},
        source_marker=source_marker,
        target_marker=target_marker,
    )
    if alignment is None:
        alignment = dtw_align(
            [bridge.source_vocab[i] for i in as_ids("source_ids", source_ids, len(source_vocab))],
            [bridge.target_vocab[i] for i in as_ids("target_ids", target_ids, len(target_vocab))],
            source_marker=source_marker,
            target_marker=target_marker,
        )
    ids, logits, _ = bridge.transfer(
        target_ids,
        source_ids,
        source_topk_ids,
        source_topk_logits,
        alignment,
        mode=mode,
        fallback=fallback,
        check_tokens=check_tokens,
    )
    counts = (ids != PAD_ID).sum(axis=1)
    return (
        [row[:n].tolist() for row, n in zip(ids, counts, strict=True)],
        [row[:n].tolist() for row, n in zip(logits, counts, strict=True)],
    )
