"""The bytes of tokens: what each id of a tokenizer spells, and where the tokens of one
tokenization end in the UTF-8 bytes of its text (the ground both byte projections and
byte-counted CE stand on).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import numpy as np

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_DUMMY_PROBE_BYTES = 32  # bytes of a tokenization's first tokens compared with its text


def _byte_level_decoding() -> dict[str, int]:
    """The byte-level BPE alphabet read backwards: each printable stand-in to its byte.

    Bytes that print as themselves keep their character; the others (controls, space, the
    bytes from 127 to 160 and 173) are numbered into characters from U+0100 on, in byte order.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in kept}
    extra = 0
    for byte in range(256):
        if byte not in kept:
            table[chr(0x100 + extra)] = byte
            extra += 1
    return table


def _decoder_kinds(tokenizer) -> set[str]:
    """Every decoder type in a fast tokenizer's pipeline (nested sequences included)."""
    found: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            if "type" in node:
                found.add(node["type"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder"))
    return found


def token_bytes(tokenizer) -> list[bytes | None]:
    """The UTF-8 bytes each id stands for, in id order; ``None`` for special tokens and ids
    no token uses. Byte-level tokens and ``<0xNN>`` byte-fallback tokens give their exact
    bytes (a piece of a character included); other tokens are decoded after a letter, so a
    decoder that strips a leading space at the start of a text keeps it here."""
    from fusion.models.loading import UNUSED_PREFIX, vocab_list

    vocab = vocab_list(tokenizer)
    special = set(tokenizer.all_special_ids) | {
        token_id for token_id, added in tokenizer.added_tokens_decoder.items() if added.special
    }
    kinds = _decoder_kinds(tokenizer)
    decoder = tokenizer.backend_tokenizer.decoder
    byte_level = _byte_level_decoding() if "ByteLevel" in kinds else None
    out: list[bytes | None] = []
    for token_id, token in enumerate(vocab):
        if token_id in special or token.startswith(UNUSED_PREFIX):
            out.append(None)
        elif byte_level is not None and all(ch in byte_level for ch in token):
            out.append(bytes(byte_level[ch] for ch in token))
        elif "ByteFallback" in kinds and (match := _BYTE_TOKEN.match(token)):
            out.append(bytes([int(match.group(1), 16)]))
        elif decoder is None:
            out.append(token.encode("utf-8"))
        else:
            text = decoder.decode(["a", token])
            out.append((text[1:] if text.startswith("a") else decoder.decode([token])).encode())
    return out


def dummy_prefix(pieces: Sequence[bytes | None], data: bytes) -> bool:
    """Whether a tokenization spells ``data`` with one space in front that the text lacks (a
    dummy prefix: SentencePiece's ``▁`` before a text's first word, a ``Prepend`` normaliser,
    ByteLevel ``add_prefix_space``), judged on its first tokens' bytes."""
    head = b""
    for piece in pieces:
        head += piece or b""
        if len(head) > _DUMMY_PROBE_BYTES:
            break
    return head[:1] == b" " and not data.startswith(head) and data.startswith(head[1:])


def byte_ends(
    pieces: Sequence[bytes | None], text: str, offsets: Sequence[Sequence[int]]
) -> np.ndarray:
    """Where each token ends in ``text``'s UTF-8 bytes, spans taken end to end.

    A dummy prefix (:func:`dummy_prefix`) has no width: the first token's leading space is not
    text. A token whose bytes are the text's next bytes takes exactly those (pieces of one
    multi-byte character included); one that differs only by a leading space the text lacks
    takes the rest; any other (normalised text, unknown tokens) ends where its character
    offsets say. ``pieces`` are the tokens' bytes (``None``: no text).
    """
    data = text.encode("utf-8")
    char_bytes: np.ndarray | None = None
    ends = np.empty(len(pieces), dtype=np.int64)
    cursor = 0
    dummy = dummy_prefix(pieces, data)
    for t, piece in enumerate(pieces):
        if dummy and piece:
            piece, dummy = piece[1:], False
            if not piece:
                ends[t] = cursor
                continue
        if piece:
            if data.startswith(piece, cursor):
                cursor += len(piece)
            elif piece[:1] == b" " and data.startswith(piece[1:], cursor):
                cursor += len(piece) - 1
            elif t < len(offsets):
                if char_bytes is None:
                    sizes = [len(ch.encode("utf-8")) for ch in text]
                    char_bytes = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
                cursor = max(cursor, int(char_bytes[int(offsets[t][1])]))
        ends[t] = cursor
    return ends
