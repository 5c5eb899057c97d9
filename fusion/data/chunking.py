"""Cutting documents into chunks of at most ``max_length`` target tokens, by characters.

Every chunk is an exact character span of its document (the spans partition it), so every
model sees the same text. The target tokenizer re-reads each span, and a span whose
re-tokenisation would not fit is shortened by a token until it does. The last chunk of a
document ends with the tokenizer's EOS, as the reference appends one (no BOS).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusion.data.corpus import Document


@dataclass(frozen=True)
class Chunk:
    """One row of the data set before any model has read it."""

    chunk_id: str
    text: str
    domain: str | None
    input_ids: np.ndarray  # int32 [L], EOS last when has_eos
    offsets: np.ndarray  # int32 [L - has_eos, 2], character spans in ``text``
    has_eos: bool


def encode(tokenizer, text: str, ends_document: bool) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (EOS appended when the document ends here) and character offsets of a text."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int32).reshape(-1, 2)
    if ends_document and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return np.asarray(ids, dtype=np.int32), offsets


def encode_for_reading(
    tokenizer, text: str, has_eos: bool, max_length: int | None, bos: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """A model's ids and offsets of a chunk, cut to what it reads (its BOS read first)."""
    ids, offsets = encode(tokenizer, text, has_eos)
    room = max_length - (bos is not None) if max_length else None
    if room and len(ids) > room:
        ids, offsets = ids[:room], offsets[:room]
    return ids, offsets


def chunk_document(document: Document, tokenizer, max_length: int) -> list[Chunk]:
    """Chunks of one document in order; documents with fewer than two tokens give none."""
    _, offsets = encode(tokenizer, document.text, ends_document=False)
    text, chunks = document.text, []
    start_char, first_token = 0, 0
    while first_token < len(offsets):
        last_token = min(first_token + max_length, len(offsets))
        while True:
            ends = last_token == len(offsets)
            end_char = len(text) if ends else int(offsets[last_token][0])
            piece = text[start_char:end_char]
            ids, piece_offsets = encode(tokenizer, piece, ends_document=ends)
            if len(ids) <= max_length or last_token - first_token <= 1:
                break
            last_token -= 1
        if len(ids) > max_length:  # one token whose re-tokenisation alone overflows
            ids, piece_offsets, ends = ids[:max_length], piece_offsets[:max_length], False
        if len(ids) >= 2:
            chunks.append(
                Chunk(
                    chunk_id=f"{document.doc_id}:{len(chunks)}",
                    text=piece,
                    domain=document.domain,
                    input_ids=ids,
                    offsets=piece_offsets,
                    has_eos=ends and len(ids) > len(piece_offsets),
                )
            )
        start_char, first_token = end_char, last_token
    return chunks
