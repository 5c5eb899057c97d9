"""The byte-consistent projection against a brute force over small vocabulary pairs.

The expected distribution at each target position is computed here from first principles:
token bytes from each tokenizer family's own spelling rules, the target's cut of every source
token by calling the target tokenizer on its text (a twin without the dummy prefix for text
that does not start the chunk), and a loop over the whole source vocabulary.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from fusion.align.projection import NONE, along_the_text, build_projection
from fusion.align.token_bytes import byte_ends, token_bytes
from fusion.testing.toy import train_tokenizer

TEXTS = [
    "Hello world, the knowledge of 12,345 things.\nIt's   spaced\tout.",
    "def f(x):\n    return x + 1  # naïve café 😀\n\n\n  end",
    "Ελληνικά and 日本語 mixed with ASCII; tabs\t\tand a trailing space ",
    "9 + 10 = 19\n1000 - 1 = 999\n",
    # the target's first token ends inside the source's first word, where the target's cut of
    # that word as the start of a text differs from its cut mid-text
    "certain aligned center: 5 ends",
    " a chunk that goes on: it starts with a space",
]
_UNICODE_TO_BYTE = {ch: b for b, ch in bytes_to_unicode().items()}
_BYTE = re.compile(r"^<0x([0-9A-F]{2})>$")


def _bytes(tokenizer: PreTrainedTokenizerFast, kind: str, token_id: int) -> bytes | None:
    """This test's own reading of a toy token: GPT-2's byte alphabet, or ▁ and <0xNN>."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    if token in ("<unk>", "<s>", "</s>"):
        return None
    if kind in ("byte_level", "prefix_space"):
        return bytes(_UNICODE_TO_BYTE[ch] for ch in token)
    if match := _BYTE.match(token):
        return bytes([int(match.group(1), 16)])
    return token.replace("▁", " ").encode()


def _spans(pieces: list[bytes], data: bytes) -> list[int]:
    """Byte ends of a tokenization that spells ``data``; where the tokens spell one space more
    than the text, in front (a dummy prefix), the first token's space has no width."""
    if b"".join(pieces) != data:
        assert b"".join(pieces) == b" " + data, (pieces, data)
        pieces = [pieces[0][1:], *pieces[1:]]
    ends, cursor = [], 0
    for piece in pieces:
        cursor += len(piece)
        ends.append(cursor)
    return ends


def _variant(tokenizer: PreTrainedTokenizerFast, kind: str) -> PreTrainedTokenizerFast:
    """A toy tokenizer with its dummy prefix written another way: a ``Prepend`` normaliser and
    no pre-tokenizer (Llama-2's and Mistral's tokenizer.json), or ByteLevel
    ``add_prefix_space``."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if kind == "prepend":
        spec["normalizer"] = _LEGACY_NORMALISER
        spec["pre_tokenizer"] = None
    else:
        spec["pre_tokenizer"]["add_prefix_space"] = True
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


_LEGACY_NORMALISER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    ],
}


def _whole_characters(data: bytes) -> str:
    for cut in range(len(data), -1, -1):
        try:
            return data[:cut].decode()
        except UnicodeDecodeError:
            continue
    return ""


class _Pair:
    """A (source, target) pair of toy tokenizers and the brute-force projection."""

    def __init__(self, source, source_kind, target, target_kind):
        self.source, self.source_kind = source, source_kind
        self.target, self.target_kind = target, target_kind
        # the same model, cutting text that does not start it: no dummy prefix
        twin = Tokenizer.from_str(target.backend_tokenizer.to_str())
        if target_kind == "metaspace":
            twin.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
        elif target_kind == "prepend":
            twin.normalizer = normalizers.Replace(" ", "▁")
        elif target_kind == "prefix_space":
            twin.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.twin = twin
        self.source_bytes = [_bytes(source, source_kind, i) for i in range(len(source))]
        self.cuts: dict[tuple[int, bool], dict[int, int]] = {}

    def dummy_prefix(self, text: str) -> bool:
        """Whether the source spells ``text`` with one space in front that the text lacks."""
        ids = self.source(text, add_special_tokens=False)["input_ids"]
        return b"".join(self.source_bytes[i] for i in ids) == b" " + text.encode()

    def spelling(self, source_id: int, after_dummy: bool) -> bytes | None:
        """What a source token spells in the text (the README's rule): its bytes, less the
        leading space where it is the chunk's first token and that space is a dummy prefix."""
        piece = self.source_bytes[source_id]
        if after_dummy and piece is not None and piece.startswith(b" "):
            piece = piece[1:] or None
        return piece

    def cut(self, source_id: int, at_start: bool, after_dummy: bool = False) -> dict[int, int]:
        """Byte offset → target id where the target's cut of the text the token spells
        starts one."""
        key = (source_id, at_start, after_dummy)
        if key not in self.cuts:
            text = _whole_characters(self.spelling(source_id, after_dummy) or b"")
            ids = (
                self.target(text, add_special_tokens=False)["input_ids"]
                if at_start
                else self.twin.encode(text, add_special_tokens=False).ids
            )
            pieces = [_bytes(self.target, self.target_kind, i) for i in ids]
            starts, cut = 0, {}
            for target_id, end in zip(ids, _spans(pieces, text.encode()), strict=True):
                if end > starts:
                    cut.setdefault(starts, target_id)
                starts = end
            self.cuts[key] = cut
        return self.cuts[key]

    def _ends(self, text: str) -> tuple[list[int], list[int]]:
        data = text.encode()
        target_ids = self.target(text, add_special_tokens=False)["input_ids"]
        source_ids = self.source(text, add_special_tokens=False)["input_ids"]
        return (
            _spans([_bytes(self.target, self.target_kind, i) for i in target_ids], data),
            _spans([self.source_bytes[i] for i in source_ids], data),
        )

    def covering(self, text: str, position: int) -> int:
        """The source token covering the end of target token ``position``."""
        target_ends, source_ends = self._ends(text)
        return next(j for j, end in enumerate(source_ends) if end > target_ends[position])

    def rest_of_label(self, text: str, position: int) -> bytes:
        """The bytes of the next target token beyond the covering source token."""
        target_ends, source_ends = self._ends(text)
        covering = self.covering(text, position)
        return text.encode()[source_ends[covering] : target_ends[position + 1]]

    def along(self, probs, source_ids, k: int, rest: bytes, bos: bool, steps: int) -> float:
        """The source's probability of continuing with ``rest`` from its token ``k`` on,
        reading along the text's own tokens (at most ``steps`` of them)."""
        if k >= len(source_ids) or steps == 0:
            return 0.0
        read = k + int(bos) - 1
        spelled = sum(
            probs[read, s]
            for s, piece in enumerate(self.source_bytes)
            if piece and piece.startswith(rest)
        )
        actual = self.source_bytes[source_ids[k]] or b""
        if 0 < len(actual) < len(rest) and rest.startswith(actual):
            further = self.along(probs, source_ids, k + 1, rest[len(actual) :], bos, steps - 1)
            spelled += probs[read, source_ids[k]] * further
        return spelled

    def expected(
        self, text: str, probs: np.ndarray, bos: bool, lookahead: bool = False
    ) -> list[np.ndarray | None]:
        """Per target position: the projected distribution, or None where there is no
        teacher (``probs[r]`` is the source's distribution at its read position ``r``); with
        ``lookahead``, where the target's next token runs past the source's token s*, the
        share of s* that continues as that token along the text moves to it."""
        data = text.encode()
        target_ids = self.target(text, add_special_tokens=False)["input_ids"]
        source_ids = self.source(text, add_special_tokens=False)["input_ids"]
        target_ends = _spans([_bytes(self.target, self.target_kind, i) for i in target_ids], data)
        source_ends = _spans([self.source_bytes[i] for i in source_ids], data)
        out: list[np.ndarray | None] = []
        for n, c in enumerate(target_ends):
            covering = [j for j, end in enumerate(source_ends) if end > c]
            j = covering[0] if covering else len(source_ends)
            b = source_ends[j - 1] if j > 0 else 0
            read = j + int(bos) - 1
            if read < 0:
                out.append(None)
                continue
            p = data[b:c]
            after_dummy = j == 0 and self.dummy_prefix(text)
            dist = np.zeros(len(self.target))
            for source_id in range(len(self.source_bytes)):
                if source_id == self.source.eos_token_id and not p:
                    dist[self.target.eos_token_id] += probs[read, source_id]
                piece = self.spelling(source_id, after_dummy)
                if piece is None or not piece.startswith(p) or len(piece) <= len(p):
                    continue
                target_id = self.cut(source_id, b == 0, after_dummy).get(len(p))
                if target_id is not None:
                    dist[target_id] += probs[read, source_id]
            runs_past = (
                j < len(source_ends)
                and n + 1 < len(target_ends)
                and target_ends[n + 1] > source_ends[j]
            )
            if lookahead and runs_past:
                rest = data[source_ends[j] : target_ends[n + 1]]
                moved = probs[read, source_ids[j]] * self.along(
                    probs, source_ids, j + 1, rest, bos, 4
                )
                short = self.cut(source_ids[j], b == 0, after_dummy).get(len(p))
                if short is not None:
                    dist[short] -= moved
                dist[target_ids[n + 1]] += moved
            out.append(dist / dist.sum() if dist.sum() > 0 else dist)
        return out


@pytest.fixture(scope="module")
def tokenizers(training_texts):
    texts = training_texts[:60]
    meta = train_tokenizer(texts, "metaspace", 700)
    bytes500 = train_tokenizer(texts, "byte_level", 500)
    return {
        "bytes500": (bytes500, "byte_level"),
        "bytes300": (train_tokenizer(texts, "byte_level", 300), "byte_level"),
        "meta700": (meta, "metaspace"),
        "prepend700": (_variant(meta, "prepend"), "prepend"),
        "prefix500": (_variant(bytes500, "prefix_space"), "prefix_space"),
    }


PAIRS = [
    ("bytes500", "meta700"),  # byte-level into Metaspace with a dummy prefix
    ("bytes300", "meta700"),  # a small source into a larger target
    ("meta700", "bytes500"),  # Metaspace with byte fallback into byte-level
    ("prepend700", "bytes500"),  # a dummy prefix written by a normaliser (Llama-2, Mistral)
    ("bytes500", "prepend700"),
    ("meta700", "prefix500"),  # into byte-level with add_prefix_space
]


@pytest.mark.parametrize(("source_name", "target_name"), PAIRS)
@pytest.mark.parametrize("bos", [True, False])
def test_projection_equals_a_brute_force_over_the_source_vocabulary(
    tokenizers, source_name, target_name, bos
):
    source, source_kind = tokenizers[source_name]
    target, target_kind = tokenizers[target_name]
    pair = _Pair(source, source_kind, target, target_kind)
    projection = build_projection(source, target)
    rng = np.random.default_rng(0)
    checked = chained = 0
    for text in TEXTS:
        target_enc = target(text, add_special_tokens=False, return_offsets_mapping=True)
        source_enc = source(text, add_special_tokens=False, return_offsets_mapping=True)
        source_ids = source_enc["input_ids"]
        probs = rng.dirichlet(np.full(len(source), 0.05), size=len(source_ids) + 1)
        for read, next_token in enumerate(source_ids[1 - int(bos) :]):
            probs[read] = 0.5 * probs[read]  # the text's own next token is likely
            probs[read, next_token] += 0.5
        plan = projection.plan(
            text,
            np.asarray(target_enc["input_ids"]),
            np.asarray(target_enc["offset_mapping"]),
            np.asarray(source_enc["input_ids"]),
            np.asarray(source_enc["offset_mapping"]),
            bos,
        )
        expected = pair.expected(text, probs, bos)
        assert [e is None for e in expected] == (plan.read_index < 0).tolist()
        rows = np.flatnonzero(plan.read_index >= 0)
        got = projection.project(
            torch.from_numpy(probs[plan.read_index[rows]]),
            plan.prefix[rows],
            plan.lo[rows],
            plan.hi[rows],
            plan.view[rows],
        )[0].numpy()
        for slot, row in enumerate(rows):
            np.testing.assert_allclose(
                got[slot], expected[row], atol=1e-9, err_msg=f"{text!r} {row}"
            )
            checked += 1
        # along the text: the chained probability that the source continues as the target's
        # next token does, where that token runs past the source's
        actual = np.zeros(len(probs))
        for read, next_token in enumerate(source_ids[1 - int(bos) :]):
            actual[read] = probs[read, next_token]
        spelled = projection.spelled_mass(
            torch.from_numpy(probs[plan.step_read]), plan.step_lo, plan.step_hi
        ).numpy()
        share = along_the_text(plan, spelled, actual)
        for row in np.flatnonzero(plan.label >= 0):
            rest = pair.rest_of_label(text, row)
            first = pair.covering(text, row) + 1
            assert share[row] == pytest.approx(
                pair.along(probs, source_ids, first, rest, bos, 4), rel=1e-9, abs=1e-12
            )
            chained += share[row] > 0
    assert checked > 100 and chained > 0


def test_token_bytes_spell_real_tokenizations_exactly():
    """GPT-2 (byte level) and Mistral (▁, byte fallback, a dummy prefix) token by token: the
    bytes of each token are the text's next bytes, multi-byte characters split or not."""
    from fusion.testing.packaged_tokenizers import gpt2_tokenizer, mistral_tokenizer

    text = "日本語 😀👍🏽 🧿 ꙮ Ελληνικά\r\n\u00a0naïve\t\tcafé  x 12,345\n\n  end "
    data = text.encode()
    for tokenizer in (gpt2_tokenizer(), mistral_tokenizer()):
        pieces = token_bytes(tokenizer)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ends = byte_ends([pieces[i] for i in encoded["input_ids"]], text, encoded["offset_mapping"])
        spelled, start = [], 0
        for token_id, end in zip(encoded["input_ids"], ends.tolist(), strict=True):
            spelled.append(data[start:end])
            piece = pieces[token_id]
            assert piece in (data[start:end], b" " + data[start:end]), (piece, data[start:end])
            start = end
        assert b"".join(spelled) == data
        # some token is a piece of a character: its bytes alone are not UTF-8
        assert any(_whole_characters(pieces[i]).encode() != pieces[i] for i in encoded["input_ids"])


def test_a_token_that_ends_inside_a_four_byte_character_is_cut_as_its_whole_characters(
    tokenizers,
):
    """A byte-level token ``ab`` + three of the four bytes of 😀 spells ``ab`` and a piece the
    target cannot cut: its cut is the target's cut of ``ab``, nothing after."""
    source, _ = tokenizers["bytes500"]
    target, target_kind = tokenizers["meta700"]
    spec = json.loads(source.backend_tokenizer.to_str())
    piece = b"ab" + "😀".encode()[:3]
    new_id = len(source)
    spec["model"]["vocab"]["".join(bytes_to_unicode()[b] for b in piece)] = new_id
    grown = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="</s>"
    )
    projection = build_projection(grown, target)
    assert projection.source_pieces[new_id] == piece
    mid = projection.spellings[0]
    row = mid.cut[mid.cut_start[new_id] : mid.cut_start[new_id] + len(piece)].tolist()
    twin = _Pair(source, "byte_level", target, target_kind).twin
    ids = twin.encode("ab", add_special_tokens=False).ids
    ends = _spans([_bytes(target, target_kind, i) for i in ids], b"ab")
    expected = [NONE] * len(piece)
    for target_id, begin in zip(ids, [0, *ends[:-1]], strict=True):
        expected[begin] = target_id
    assert row == expected and row[0] != NONE


def _tables(projection) -> list[np.ndarray]:
    return [t for s in projection.spellings for t in (s.cut, s.dense)]


def _same_tables(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(_tables(a), _tables(b), strict=True))


def test_the_tables_are_read_back_from_the_cache_instead_of_built(tokenizers, tmp_path):
    source, _ = tokenizers["bytes500"]
    target, _ = tokenizers["meta700"]
    built = build_projection(source, target, cache=tmp_path)
    (file,) = tmp_path.glob("byte-projection-*.npz")
    assert not np.array_equal(built.spellings[0].cut, built.spellings[1].cut)  # dummy prefix
    with np.load(file) as stored:
        planted = {name: np.full_like(stored[name], 7) for name in stored.files}
    np.savez(file, **planted)  # tables no build would make: seen only if the file is read
    again = build_projection(source, target, cache=tmp_path)
    assert all((s.cut == 7).all() for s in again.spellings)


def test_each_tokenizer_pair_has_its_own_cache_entry(tokenizers, tmp_path):
    """Another target, and the same target with other special tokens (the same tokenizer.json),
    each get their own tables, equal to tables built without a cache."""
    import copy

    source, _ = tokenizers["meta700"]
    target, _ = tokenizers["bytes500"]
    other_specials = copy.deepcopy(target)
    other_specials.eos_token = "Ġthe"  # an ordinary token becomes special: it spells nothing
    assert other_specials.backend_tokenizer.to_str() == target.backend_tokenizer.to_str()
    other_target, _ = tokenizers["bytes300"]
    build_projection(source, target, cache=tmp_path)
    for variant in (other_specials, other_target):
        fresh = build_projection(source, variant)
        assert not _same_tables(fresh, build_projection(source, target))
        assert _same_tables(build_projection(source, variant, cache=tmp_path), fresh)
    assert len(list(tmp_path.glob("byte-projection-*.npz"))) == 3


@pytest.mark.parametrize("damage", ["truncated", "not an npz", "tables missing"])
def test_a_damaged_cache_entry_is_built_again_and_replaced(tokenizers, tmp_path, damage):
    source, _ = tokenizers["meta700"]
    target, _ = tokenizers["bytes500"]
    fresh = build_projection(source, target)
    build_projection(source, target, cache=tmp_path)
    (file,) = tmp_path.glob("byte-projection-*.npz")
    whole = file.read_bytes()
    if damage == "truncated":
        file.write_bytes(whole[: len(whole) // 2])
    elif damage == "not an npz":
        file.write_bytes(b"\x00garbage" * 10)
    else:
        np.savez(file, mid=np.zeros(3, np.int32))
    assert _same_tables(build_projection(source, target, cache=tmp_path), fresh)
    assert file.read_bytes() == whole  # the entry is whole again


def _learned(model, tokenizer, text: str, steps: int = 40):
    """``model`` after a few steps of next-token training on ``text`` (read after BOS)."""
    ids = torch.tensor(
        [[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]]
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    return model.eval()


def test_the_backend_projects_its_own_full_distributions_chunk_by_chunk(tokenizers, tmp_path):
    """HFTopK.read_projected over a batch whose head runs in several chunks equals the brute
    force on the model's dense logits: top-k ids, log-probabilities, tail mass, coverage."""
    from fusion.config import ModelConfig
    from fusion.teacher.backends.hf import HFTopK
    from fusion.testing.toy import save_model_dir, tiny_causal_lm

    source, source_kind = tokenizers["bytes300"]
    target, target_kind = tokenizers["meta700"]
    # 1 MB holds ~145 positions: several chunks. After "instance" the target's next token runs
    # past a source token that the target would not cut where it stopped (a piece of ’): the
    # model learns that line, so the share it moves along the text is large enough to see
    texts = [TEXTS[0] * 12, TEXTS[1] * 3, 'the new instance’s "__init__()" method']
    learned = _learned(tiny_causal_lm("llama", len(source), seed=3), source, texts[2])
    folder = save_model_dir(tmp_path / "src", learned, source)
    model = ModelConfig(path=str(folder), bos="always", logits_budget_mb=1)
    reader = HFTopK(model, "sources.0", num_gpus=0, top_k=5, read_bos=True)
    projection = build_projection(source, target)
    pair = _Pair(source, source_kind, target, target_kind)
    sequences, plans = [], []
    for text in texts:
        ids, offsets = reader.encode(text, False)
        target_enc = target(text, add_special_tokens=False, return_offsets_mapping=True)
        sequences.append(ids)
        plans.append(
            projection.plan(
                text,
                np.asarray(target_enc["input_ids"]),
                np.asarray(target_enc["offset_mapping"]),
                ids,
                offsets,
                True,
            )
        )
    assert max(len(s) for s in sequences) > 300
    assert any(((p.label >= 0) & (p.short < 0)).any() for p in plans)
    results = reader.read_projected(sequences, ["a", "b", "c"], plans, projection)
    for text, sequence, result in zip(texts, sequences, results, strict=True):
        with torch.no_grad():
            read = torch.tensor([[source.bos_token_id, *sequence.tolist()]])
            probs = torch.softmax(reader.model(read).logits[0].double(), -1).numpy()
        for position, dist in enumerate(pair.expected(text, probs, True, lookahead=True)):
            if dist is None or dist.sum() == 0:
                assert not result.aligned[position]
                continue
            assert result.aligned[position]
            top = [i for i in np.argsort(-dist, kind="stable")[:5] if dist[i] > 0]
            padding = [-1] * (5 - len(top))  # fewer than k target ids hold any mass
            assert result.ids[position].tolist() == top + padding
            np.testing.assert_allclose(
                np.exp(result.logits[position]), [*dist[top], *[0.0] * len(padding)], rtol=1e-4
            )
            assert result.tail[position] == pytest.approx(1 - dist[top].sum(), abs=1e-5)
