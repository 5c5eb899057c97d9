"""Vocabulary maps kept on disk by what they depend on, so no run pays for the same map twice.

A MinED map of a 262k-token vocabulary against a 32k one takes minutes; it depends only on
the two vocabularies (token strings in id order), their whitespace markers and the kind of
map. The key hashes exactly those, so a changed tokenizer can never reuse a stale map.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from fusion.data.files import write_text_atomically

_FORMAT = "fusion-vocab-map/1"


def map_key(
    kind: str,
    source_vocab: Sequence[str],
    target_vocab: Sequence[str],
    source_marker: str,
    target_marker: str,
) -> str:
    """A hash of everything a vocabulary map depends on."""
    digest = hashlib.sha256(json.dumps([_FORMAT, kind, source_marker, target_marker]).encode())
    for vocab in (source_vocab, target_vocab):
        digest.update(b"\0" + "\n".join(vocab).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:32]


def cached_map(
    folder: str | Path | None,
    build: Callable[..., dict[str, str]],
    source_vocab: Sequence[str],
    target_vocab: Sequence[str],
    *,
    source_marker: str,
    target_marker: str,
) -> dict[str, str]:
    """``build(source_vocab, target_vocab, source_marker=, target_marker=)`` (a vocabulary map
    function such as ``mined_vocab_map``), read from ``folder`` when an earlier run kept it.

    ``folder=None`` turns the cache off; an unreadable entry is built again and replaced.
    """

    def run() -> dict[str, str]:
        return build(
            source_vocab, target_vocab, source_marker=source_marker, target_marker=target_marker
        )

    if folder is None:
        return run()
    kind = build.__name__
    key = map_key(kind, source_vocab, target_vocab, source_marker, target_marker)
    file = Path(folder).expanduser() / f"{kind}-{key}.json"
    if file.is_file():
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # a damaged entry: build it again
    mapping = run()
    file.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(file, json.dumps(mapping, ensure_ascii=False))
    return mapping
