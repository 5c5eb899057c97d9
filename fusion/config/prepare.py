"""The sections of the run config that `fusion prepare` reads: the corpus, the alignment,
the fusion and the output."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from fusion.config.base import Strict


class DataConfig(Strict):
    """The corpus."""

    paths: Annotated[list[str], Field(min_length=1)]
    """Files, folders or globs; local or any URI pyarrow understands (s3://, gs://)."""
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    """'auto' decides by file extension (.txt, .jsonl/.json, .parquet)."""
    text_field: str = "text"
    """Column or JSON key holding the document text."""
    id_field: str | None = None
    """Column holding a stable document id; by default the file and row number."""
    domain_field: str | None = None
    """Column holding a domain label, kept for per-domain evaluation."""
    max_length: Annotated[int, Field(ge=2)] = 2048
    """Longest chunk, in target tokens; longer documents are cut into several chunks."""
    shard_mb: Annotated[float, Field(gt=0)] = 64.0
    """Uncompressed JSONL files larger than this are read as byte ranges of this size, in
    parallel (each range is a unit of resume)."""
    block_chunks: Annotated[int, Field(ge=1)] = 64
    """Chunks per block handed from reading to the models: progress and commits come at
    least this often, however large a document or shard is."""
    readers: Annotated[int, Field(ge=1)] | None = None
    """Actors reading and chunking the corpus (0.1 CPU each); default: one per four model
    actors, at most one per shard."""


class AlignConfig(Strict):
    """How source distributions are moved into the target vocabulary."""

    method: Literal["auto", "dtw", "offsets", "bytes"] = "auto"
    """'dtw' as the reference; 'offsets' pairs positions by character offsets (exact);
    'bytes' projects each source's full next-token distribution into the target vocabulary
    where the target's tokens end (clean mode, hf sources; vocab_map is then not used).
    'auto' is 'dtw' in reference mode and 'bytes' in clean mode ('offsets' where a source's
    backend gives only a top-k): the resolved config names the method that ran."""
    vocab_map: Literal["mined", "exact"] = "mined"
    """'mined' maps unmatched tokens to the nearest by edit distance; 'exact' drops them."""
    mode: Literal["reference", "clean"] = "reference"
    """'reference' reproduces FuseLLM's quirks; 'clean' fixes them (see README)."""
    top_k: Annotated[int, Field(ge=1, le=1000)] = 10
    """Entries kept per position."""
    map_cache: str | None = "~/.cache/fusion/vocab-maps"
    """Folder where vocabulary maps and byte-projection tables are kept, keyed by what they
    depend on (both tokenizers, markers, kind), so a re-run or another job reuses them (null:
    always compute)."""


class FuseConfig(Strict):
    """How candidate distributions become one teacher."""

    method: Literal["min_ce", "avg_ce"] = "min_ce"
    """MinCE takes the candidate with the lowest CE; AvgCE mixes them."""
    granularity: Literal["sequence", "token", "window", "prefix"] = "sequence"
    """Choose once per chunk, per position, per block of ``window`` positions (each candidate
    scored by its stored distribution's CE on the block's next tokens), or at each position
    from the ``window`` positions before it ('prefix': the candidates that have predicted this
    text best so far, the label at the position itself unseen). 'window' and 'prefix' are
    clean-mode rules."""
    window: Annotated[int, Field(ge=1)] = 32
    """Positions per block ('window') or looked back on ('prefix')."""
    ce_unit: Literal["auto", "token", "byte"] = "auto"
    """What a per-sequence CE is divided by: 'token' (the reference: each model's mean NLL
    per token of its own tokenization, which favours tokenizers that split more) or 'byte'
    (total NLL over the chunk's UTF-8 bytes, comparable across tokenizers). 'auto' is
    'byte' in clean mode and 'token' in reference mode. Per-token fusion scores every
    candidate on the same target token, so the unit does not matter there."""
    no_teacher: Literal["one_hot", "mask"] = "one_hot"
    """A position where no candidate has a usable distribution (none aligned there, or per
    token none whose top-k holds the label): 'one_hot' teaches the label, 'mask' leaves the
    position out of the fusion loss."""

    def per_byte(self, mode: str) -> bool:
        """Whether per-sequence CEs are compared per byte under alignment ``mode``."""
        return self.ce_unit == "byte" or (self.ce_unit == "auto" and mode == "clean")


class OutputConfig(Strict):
    """Where the fused data set goes."""

    dir: str
    """Folder (or URI) of the Parquet data set and its manifest.json."""
    rows_per_file: Annotated[int, Field(ge=1)] = 512
    """Rows per Parquet file, each a commit: a killed run keeps every file it finished."""
