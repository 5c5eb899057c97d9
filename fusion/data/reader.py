"""The reading stage of `fusion prepare`: shards of the corpus in, the target-token chunks of
their documents out (one row each: ``id``, ``domain``, ``text``, ``input_ids``, the target's
``offsets``, ``shard`` and ``shard_total``), chunks already written skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from fusion.config import DataConfig
from fusion.data.chunking import Chunk, chunk_document
from fusion.data.corpus import CorpusError, Shard, read_documents

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def object_array(values: list) -> np.ndarray:
    """A 1-D object array of per-row values (keeps ragged arrays as they are)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


class ChunkStage:
    """Reads shards and cuts their documents into chunks; skips chunks already written.

    ``tokenizer`` is the target's tokenizer as the driver loaded it: unpickled, it needs only
    its own class, where loading it again would import transformers' auto classes and with
    them torch (2.5 s of CPU per reader). A remote-code tokenizer, whose classes a worker may
    not find, comes as ``load_tokenizer`` instead, called here.
    """

    def __init__(
        self,
        data: DataConfig,
        done_ids: dict[int, set[str]],
        bos: int | None = None,
        skip: dict[int, int] | None = None,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        load_tokenizer: Callable[[], PreTrainedTokenizerBase] | None = None,
    ):
        if (tokenizer is None) == (load_tokenizer is None):
            raise ValueError("give the reader a tokenizer or a function that loads one")
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
        self.data = data
        self.done_ids = done_ids
        self.skip = skip or {}  # shard: its first chunks a resumed stream already trained on
        self.length = data.max_length - (bos is not None)  # training rows start with the BOS

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: list[Chunk] = []
        shards, totals = [], []
        for row in range(len(batch["index"])):
            shard = Shard.from_descriptor({k: v[row] for k, v in batch.items()})
            chunks = self._chunks(shard)
            done = self.done_ids.get(shard.index, set())
            first = self.skip.get(shard.index, 0)
            todo = [chunk for chunk in chunks[first:] if chunk.chunk_id not in done]
            rows += todo
            shards += [shard.index] * len(todo)
            totals += [len(chunks)] * len(todo)
        return {
            "id": np.asarray([c.chunk_id for c in rows], dtype=object),
            "domain": object_array([c.domain for c in rows]),
            "text": np.asarray([c.text for c in rows], dtype=object),
            "input_ids": object_array([c.input_ids for c in rows]),
            "offsets": object_array([c.offsets for c in rows]),
            "shard": np.asarray(shards, dtype=np.int64),
            "shard_total": np.asarray(totals, dtype=np.int64),
        }

    def _chunks(self, shard: Shard) -> list[Chunk]:
        """Every chunk of the shard; a document id seen twice is an error naming it."""
        chunks, seen = [], set()
        for document in read_documents(shard, self.data):
            if document.doc_id in seen:
                field = f"data.id_field {self.data.id_field!r}" if self.data.id_field else "id"
                raise CorpusError(
                    f"{shard.name}: two documents have the {field} {document.doc_id!r}; ids "
                    "must be unique (they are how a re-run knows what is done): fix the "
                    "corpus, or unset data.id_field to number documents by file and line"
                )
            seen.add(document.doc_id)
            chunks.extend(chunk_document(document, self.tokenizer, self.length))
        return chunks
