"""Byte-consistent projection of a source's full next-token distribution into target ids.

At target position ``i`` the target has read the text up to ``c``, the end of its token ``i``.
Let ``b`` be the start of the source token that covers byte ``c`` in the source's own
tokenization (token spans end to end, leading spaces included), so ``p = text[b:c]`` is the
part of that source token already read. The source's distribution at the position that
predicts the token starting at ``b`` is restricted to the tokens whose bytes begin with ``p``
and go beyond it; each gives its probability to the target token that starts at byte ``|p|``
in the target tokenizer's own cut of that token's text. A token the target would not cut at
``|p|`` is inconsistent with the target having stopped at ``c`` and teaches nothing; the rest
are renormalised (the distribution of the next target token given that the target cut at
``c``). The source's EOS goes to the target's EOS where ``p`` is empty.

A token's bytes are what it spells, except for a chunk's first token where the source writes
a dummy prefix (a space the text lacks, :func:`~fusion.align.token_bytes.dummy_prefix`): there
every token spells its bytes less a leading space (``▁def`` spells ``def``), and the cut is the
target's cut of that spelling (:class:`Spelling`, one per way of spelling).

The cut of every source token is computed once per tokenizer pair (:func:`build_projection`,
cached on disk) as one table entry per (token, byte offset); a position then costs a prefix
search in the sorted source vocabulary and one scatter-add over the matching tokens
(:meth:`ByteProjection.project`), on the device that computed the probabilities.

Where the target's next token runs past the end of the source token that the text has there
(a small source into a larger target, or a target token that joins two of the source's), the
source's probability of that token (``P(s*)``) is split along the text: the share with which
the source, having read ``s*``, continues the way the target's token does (its next tokens'
probabilities, read further along the text where the next source token is shorter than the
rest) goes to the target's token, and only the remainder to the target's cut of ``s*`` alone
(:func:`along_the_text`). Other continuations than the text's are not read (the source has no
distribution there), so longer target tokens off the text get nothing from ``s*``.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusion.align.token_bytes import byte_ends, dummy_prefix, token_bytes
from fusion.data.files import write_bytes_atomically

_FORMAT = "fusion-byte-projection/2"  # /2: the spelling after a dummy prefix
LOOKAHEAD_STEPS = 4  # source tokens read along the text past the covering one, at most
NONE = -1  # "no target token" in the tables and plans


MID, START, AFTER_DUMMY = 0, 1, 2  # how a source token spells text (``PositionPlan.view``)


@dataclass(frozen=True)
class PositionPlan:
    """Where each target position of one row reads the source (``[n]`` arrays, target text
    positions only): the source read index (:data:`NONE`: no teacher), the length of the
    prefix already read, its range ``[lo, hi)`` in the sorted spellings of the source
    vocabulary, and which spelling applies (``view``: :data:`MID`; :data:`START`, where the
    source token starts the chunk and the target's own start-of-text cut applies; or
    :data:`AFTER_DUMMY`, the chunk's first token of a source that adds a dummy prefix)."""

    read_index: np.ndarray
    prefix: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    view: np.ndarray
    # Where the target's next token runs past the covering source token s*: that token
    # (``label``, else NONE) and the target's cut of s* at the prefix (``short``, or NONE);
    # then the steps along the text, flat: which position (``step_owner``), at which read
    # index, the sorted range of the source tokens that spell the rest of the target token
    # (``step_lo``/``step_hi``, equal ones included) and whether the text's own next source
    # token is a strict prefix of that rest (``step_more``: the next step reads on).
    label: np.ndarray
    short: np.ndarray
    step_owner: np.ndarray
    step_read: np.ndarray
    step_lo: np.ndarray
    step_hi: np.ndarray
    step_more: np.ndarray


@dataclass(frozen=True)
class Spelling:
    """The source's tokens as they spell text in one place (mid-text, a chunk's start, or a
    chunk's first token after a dummy prefix): their bytes, sorted for prefix search, and the
    target's cut of each at every byte offset."""

    pieces: list[bytes | None]  # by source id; None: spells no text here
    sorted_pieces: list[bytes]
    sorted_ids: np.ndarray  # int64: source id of each sorted entry
    cut_start: np.ndarray  # int64 [V_s]: where each token's row starts in ``cut``
    cut: np.ndarray  # int32: target id starting at each byte offset (NONE: none starts)
    dense: np.ndarray  # int64 [V_s]: target id of each whole token (offset 0); EOS to EOS

    def prefix_range(self, prefix: bytes) -> tuple[int, int]:
        """The sorted entries that begin with ``prefix`` and go beyond it."""
        lo = bisect.bisect_right(self.sorted_pieces, prefix)  # after every entry equal to it
        hi = bisect.bisect_right(self.sorted_pieces, prefix, lo=lo, key=lambda p: p[: len(prefix)])
        return lo, hi

    def spelling_range(self, rest: bytes) -> tuple[int, int]:
        """The sorted entries that begin with ``rest`` (equal ones included)."""
        lo = bisect.bisect_left(self.sorted_pieces, rest)
        hi = bisect.bisect_right(self.sorted_pieces, rest, lo=lo, key=lambda p: p[: len(rest)])
        return lo, hi


@dataclass(frozen=True)
class ByteProjection:
    """The tables of one (source, target) tokenizer pair; see the module docstring."""

    source_pieces: list[bytes | None]
    target_pieces: list[bytes | None]
    spellings: tuple[Spelling, Spelling, Spelling]  # by view: MID, START, AFTER_DUMMY
    target_size: int

    def plan(
        self,
        text: str,
        target_ids: np.ndarray,
        target_offsets: np.ndarray,
        source_ids: np.ndarray,
        source_offsets: np.ndarray,
        bos_read: bool,
    ) -> PositionPlan:
        """The reading plan of one chunk: target position ``i`` (of the target's text tokens)
        reads the source position that predicts the source token covering the end of target
        token ``i``."""
        n_target, n_source = len(target_offsets), len(source_offsets)
        target_pieces = [self.target_pieces[t] for t in np.asarray(target_ids)[:n_target]]
        source_ids = np.asarray(source_ids)
        source_pieces = [self.source_pieces[s] for s in source_ids[:n_source]]
        target_ends = byte_ends(target_pieces, text, target_offsets)
        source_ends = byte_ends(source_pieces, text, source_offsets)
        source_last = int(source_ends[-1]) if n_source else 0
        data = text.encode("utf-8")
        after_dummy = dummy_prefix(source_pieces, data)
        read = np.full(n_target, NONE, dtype=np.int64)
        prefix = np.zeros(n_target, dtype=np.int64)
        lo = np.zeros(n_target, dtype=np.int64)
        hi = np.zeros(n_target, dtype=np.int64)
        view = np.zeros(n_target, dtype=np.int64)
        label = np.full(n_target, NONE, dtype=np.int64)
        short = np.full(n_target, NONE, dtype=np.int64)
        steps: list[tuple[int, int, int, int, bool]] = []
        mid = self.spellings[MID]
        covering = np.searchsorted(source_ends, target_ends, side="right")
        for i, (c, j) in enumerate(zip(target_ends.tolist(), covering.tolist(), strict=True)):
            if j >= n_source and c != source_last:
                continue  # beyond what the source read
            b = int(source_ends[j - 1]) if j > 0 else 0
            index = j + int(bos_read) - 1
            if index < 0:
                continue  # the first token: predicted only after a BOS
            read[i], prefix[i] = index, c - b
            view[i] = AFTER_DUMMY if j == 0 and after_dummy else START if b == 0 else MID
            spelling = self.spellings[view[i]]
            if c > b:
                lo[i], hi[i] = spelling.prefix_range(data[b:c])
            if j >= n_source or i + 1 >= n_target or target_ends[i + 1] <= source_ends[j]:
                continue  # the next target token ends within s* (or there is none)
            covered = int(source_ids[j])
            if not spelling.pieces[covered]:
                continue
            label[i] = int(np.asarray(target_ids)[i + 1])
            short[i] = spelling.cut[spelling.cut_start[covered] + c - b]
            rest = data[int(source_ends[j]) : int(target_ends[i + 1])]
            for k in range(j + 1, min(j + 1 + LOOKAHEAD_STEPS, n_source)):
                actual = source_pieces[k] or b""
                more = 0 < len(actual) < len(rest) and rest.startswith(actual)
                steps.append((i, k + int(bos_read) - 1, *mid.spelling_range(rest), more))
                if not more:
                    break
                rest = rest[len(actual) :]
        flat = np.asarray(steps, dtype=np.int64).reshape(-1, 5)
        return PositionPlan(
            read, prefix, lo, hi, view, label, short, *flat.T[:4], flat[:, 4].astype(bool)
        )

    def project(self, probs, prefix: np.ndarray, lo: np.ndarray, hi: np.ndarray, view):
        """Target-space distributions ``[n, V_t]`` from source probabilities ``[n, V]`` (a
        torch tensor; rows paired with ``prefix``/``lo``/``hi``/``view`` of their plan),
        renormalised, and the mass each row had before (``[n, 1]``: 0 where nothing teaches)."""
        import torch

        device = probs.device
        view = np.asarray(view)
        out = torch.zeros(probs.shape[0], self.target_size, dtype=probs.dtype, device=device)
        columns = probs.shape[1]
        for kind, spelling in enumerate(self.spellings):
            rows = np.flatnonzero((prefix == 0) & (view == kind))
            if not rows.size:
                continue
            # ids that teach nothing add into one extra column, dropped afterwards
            table = np.full(columns, self.target_size, dtype=np.int64)
            known = spelling.dense[:columns]
            table[: len(known)] = np.where(known >= 0, known, self.target_size)
            picked = torch.as_tensor(rows, device=device)
            part = torch.zeros(len(rows), self.target_size + 1, dtype=probs.dtype, device=device)
            part.index_add_(1, torch.as_tensor(table, device=device), probs[picked])
            out[picked] += part[:, : self.target_size]
        partial = np.flatnonzero(prefix > 0)
        if partial.size:
            row_parts, source_parts, target_parts = [], [], []
            for row in partial.tolist():
                spelling = self.spellings[view[row]]
                ids = spelling.sorted_ids[lo[row] : hi[row]]
                targets = spelling.cut[spelling.cut_start[ids] + prefix[row]]
                keep = targets >= 0
                row_parts.append(np.full(int(keep.sum()), row, dtype=np.int64))
                source_parts.append(ids[keep])
                target_parts.append(targets[keep].astype(np.int64))
            rows_t = torch.as_tensor(np.concatenate(row_parts), device=device)
            sources_t = torch.as_tensor(np.concatenate(source_parts), device=device)
            targets_t = torch.as_tensor(np.concatenate(target_parts), device=device)
            out.index_put_((rows_t, targets_t), probs[rows_t, sources_t], accumulate=True)
        total = out.sum(-1, keepdim=True)
        return out / torch.where(total > 0, total, torch.ones_like(total)), total

    def spelled_mass(self, probs, lo: np.ndarray, hi: np.ndarray):
        """``[n]``: each row's probability on the mid-text sorted entries ``[lo, hi)`` (the
        tokens that spell a given text, :meth:`Spelling.spelling_range`)."""
        import torch

        sorted_ids = self.spellings[MID].sorted_ids
        sizes = np.asarray(hi) - np.asarray(lo)
        rows = np.repeat(np.arange(len(sizes)), sizes)
        ids = np.concatenate([sorted_ids[a:b] for a, b in zip(lo, hi, strict=True)] or [[]])
        device = probs.device
        picked = probs[
            torch.as_tensor(rows, device=device),
            torch.as_tensor(ids, dtype=torch.long, device=device),
        ]
        out = torch.zeros(len(sizes), dtype=probs.dtype, device=device)
        return out.index_add_(0, torch.as_tensor(rows, device=device), picked)


def along_the_text(plan: PositionPlan, spelled: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """``[n]``: per target position with a ``label``, the source's probability, having read
    s*, of continuing as the target's token does: the steps' spelled masses chained through
    the text's own next tokens (``spelled`` per step; ``actual[r]``: the probability at read
    index ``r`` of the token the text has next). 0 where there is no label."""
    share = np.zeros(len(plan.label))
    carried: dict[int, float] = {}
    for step in range(len(plan.step_owner) - 1, -1, -1):  # each chain from its last step
        owner = int(plan.step_owner[step])
        later = carried.pop(owner, 0.0) if plan.step_more[step] else 0.0
        value = float(spelled[step]) + later * float(actual[plan.step_read[step]])
        if step == 0 or plan.step_owner[step - 1] != owner:
            share[owner] = value
        else:
            carried[owner] = value
    return share


def _longest_text(data: bytes) -> str:
    """The longest prefix of ``data`` that is whole UTF-8 characters, as text."""
    for cut in range(len(data), max(len(data) - 4, 0) - 1, -1):
        try:
            return data[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return ""


def _without_prefix_space(tokenizer_json: dict) -> dict:
    """A tokenizer's JSON with every dummy prefix switched off: how it cuts text that does not
    start a document (Metaspace ``prepend_scheme``, ByteLevel ``add_prefix_space``,
    a ``Prepend`` normaliser)."""

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "Prepend":
                return None
            node = {key: walk(value) for key, value in node.items()}
            if node.get("type") == "Metaspace":
                node["prepend_scheme"] = "never"
                node.pop("add_prefix_space", None)
            if node.get("type") == "ByteLevel" and "add_prefix_space" in node:
                node["add_prefix_space"] = False
            return node
        if isinstance(node, list):
            return [kept for kept in (walk(value) for value in node) if kept is not None]
        return node

    changed = dict(tokenizer_json)
    for key in ("normalizer", "pre_tokenizer"):
        changed[key] = walk(tokenizer_json.get(key))
    return changed


def _cut_table(
    backend, pieces: list[bytes | None], target_pieces: list[bytes | None], starts: np.ndarray
) -> np.ndarray:
    """For every source token and byte offset, the target token that starts there when the
    target tokenizes the token's text (:data:`NONE` where none does)."""
    size = int(sum(len(p) for p in pieces if p))
    table = np.full(size, NONE, dtype=np.int32)
    ids = [i for i, p in enumerate(pieces) if p]
    texts = [_longest_text(pieces[i]) for i in ids]
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    for source_id, text, encoding in zip(ids, texts, encodings, strict=True):
        cut = [target_pieces[t] for t in encoding.ids]
        ends = byte_ends(cut, text, encoding.offsets)
        begin, base = 0, int(starts[source_id])
        limit = len(text.encode("utf-8"))
        for target_id, end in zip(encoding.ids, ends.tolist(), strict=True):
            if end > begin and begin < limit and table[base + begin] == NONE:
                table[base + begin] = target_id
            begin = max(begin, end)
    return table


def adds_dummy_prefix(tokenizer, pieces: list[bytes | None]) -> bool:
    """Whether a tokenizer spells the start of a text with a space the text lacks (its
    tokens of ``"a"`` spell ``" a"``): Metaspace ``prepend_scheme`` first or always, a
    ``Prepend`` normaliser (Llama-2, Mistral), ByteLevel ``add_prefix_space``."""
    ids = tokenizer.backend_tokenizer.encode("a", add_special_tokens=False).ids
    return dummy_prefix([pieces[i] for i in ids], b"a")


def _after_dummy(piece: bytes | None) -> bytes | None:
    """What a token spells as the first token after a dummy prefix: its bytes less a leading
    space (a lone space spells nothing)."""
    if piece is None or not piece.startswith(b" "):
        return piece
    return piece[1:] or None


def _starts(pieces: list[bytes | None]) -> np.ndarray:
    """Where each token's row starts in a cut table (:data:`NONE`: a token without text)."""
    starts = np.full(len(pieces), NONE, dtype=np.int64)
    lengths = np.asarray([len(p) if p else 0 for p in pieces], dtype=np.int64)
    has_text = lengths > 0
    starts[has_text] = np.concatenate([[0], np.cumsum(lengths[has_text])[:-1]])
    return starts


def _spelling(
    pieces: list[bytes | None], cut: np.ndarray, eos: tuple[int | None, int | None], like=None
) -> Spelling:
    """A :class:`Spelling` of ``pieces`` with its cut table; ``like``: one with the same
    pieces whose sorted list and starts it shares (a 262k vocabulary is sorted once)."""
    if like is not None:
        sorted_pieces, sorted_ids, starts = like.sorted_pieces, like.sorted_ids, like.cut_start
    else:
        order = sorted((i for i, p in enumerate(pieces) if p), key=pieces.__getitem__)
        sorted_pieces = [pieces[i] for i in order]
        sorted_ids = np.asarray(order, dtype=np.int64)
        starts = _starts(pieces)
    dense = np.full(len(pieces), NONE, dtype=np.int64)
    has_text = starts >= 0
    dense[has_text] = cut[starts[has_text]]
    if eos[0] is not None and eos[1] is not None:
        dense[eos[0]] = eos[1]
    return Spelling(pieces, sorted_pieces, sorted_ids, starts, cut, dense)


def projection_key(source, target) -> str:
    """A hash of everything the tables depend on: both tokenizers whole."""
    digest = hashlib.sha256(_FORMAT.encode())
    for tokenizer in (source, target):
        digest.update(b"\0" + tokenizer.backend_tokenizer.to_str().encode("utf-8"))
        digest.update(json.dumps(sorted(tokenizer.all_special_ids)).encode())
    return digest.hexdigest()[:32]


def build_projection(source, target, *, cache: str | Path | None = None) -> ByteProjection:
    """The projection tables of a (source, target) pair of fast tokenizers, read from
    ``cache`` when an earlier run kept them (they take seconds at a 262k vocabulary)."""
    from tokenizers import Tokenizer

    file = None
    if cache is not None:
        file = Path(cache).expanduser() / f"byte-projection-{projection_key(source, target)}.npz"
    source_pieces, target_pieces = token_bytes(source), token_bytes(target)
    views: dict[str, list[bytes | None]] = {"mid": source_pieces, "start": source_pieces}
    if adds_dummy_prefix(source, source_pieces):
        views["after_dummy"] = [_after_dummy(p) for p in source_pieces]
    starts = {name: _starts(pieces) for name, pieces in views.items()}
    tables = _load(file, views)
    if tables is None:
        backend = target.backend_tokenizer
        original = json.loads(backend.to_str())
        mid_json = _without_prefix_space(original)
        mid = backend if mid_json == original else Tokenizer.from_str(json.dumps(mid_json))
        tables = {}
        for name, pieces in views.items():
            cutter = mid if name == "mid" else backend
            if name == "start" and cutter is mid:
                tables[name] = tables["mid"]
                continue
            tables[name] = _cut_table(cutter, pieces, target_pieces, starts[name])
        _save(file, tables)
    eos = (source.eos_token_id, target.eos_token_id)
    mid_spelling = _spelling(source_pieces, tables["mid"], eos)
    start_spelling = _spelling(source_pieces, tables["start"], eos, like=mid_spelling)
    after = start_spelling
    if "after_dummy" in views:
        after = _spelling(views["after_dummy"], tables["after_dummy"], eos)
    return ByteProjection(
        source_pieces=source_pieces,
        target_pieces=target_pieces,
        spellings=(mid_spelling, start_spelling, after),
        target_size=len(target_pieces),
    )


def _load(file: Path | None, views: dict[str, list[bytes | None]]) -> dict[str, np.ndarray] | None:
    """The cut tables kept in ``file``, or None where there are none or they do not fit these
    spellings (a damaged or foreign entry is built again)."""
    if file is None or not file.is_file():
        return None
    try:
        with np.load(file) as stored:
            tables = {name: stored[name] for name in views}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    for name, pieces in views.items():
        if tables[name].shape != (sum(len(p) for p in pieces if p),):
            return None
    return tables


def _save(file: Path | None, tables: dict[str, np.ndarray]) -> None:
    if file is None:
        return
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **tables)
    file.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(file, buffer.getvalue())
