"""Reading the corpus: planning shards and yielding documents, local or remote.

A shard is the unit of resumable work: one text or JSONL file, or one row group of a Parquet
file. Shards are listed by the driver (paths only, never the data); documents are read inside
Ray tasks. Every document gets a stable id: the configured id field, or ``file#row``.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fusion.config import DataConfig
from fusion.errors import FusionError

_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
}


class CorpusError(FusionError):
    """A corpus file or document that cannot be read as configured."""


@dataclass(frozen=True)
class Shard:
    """One unit of work: a file (and, for Parquet, one row group)."""

    index: int
    path: str
    format: str
    row_group: int | None = None

    @property
    def name(self) -> str:
        return self.path if self.row_group is None else f"{self.path}@{self.row_group}"


@dataclass(frozen=True)
class Document:
    """One document of the corpus."""

    doc_id: str
    text: str
    domain: str | None


def open_filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a local path or URI, and the path within it."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def _expand(pattern: str) -> list[str]:
    """Files named by a path, folder or glob (local), or a file/folder URI."""
    if "://" not in pattern:
        if any(ch in pattern for ch in "*?["):
            return sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        path = Path(pattern)
        if path.is_dir():
            return sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix in _FORMATS)
        return [str(path)] if path.exists() else []
    filesystem, inner = pafs.FileSystem.from_uri(pattern)
    info = filesystem.get_file_info(inner)
    if info.type == pafs.FileType.Directory:
        listing = filesystem.get_file_info(pafs.FileSelector(inner, recursive=True))
        scheme = pattern.split("://", 1)[0]
        return sorted(
            f"{scheme}://{item.path}"
            for item in listing
            if item.type == pafs.FileType.File and Path(item.path).suffix in _FORMATS
        )
    return [pattern] if info.type == pafs.FileType.File else []


def _format_of(path: str, configured: str) -> str:
    if configured != "auto":
        return configured
    suffix = Path(path.split("://", 1)[-1]).suffix.lower()
    if suffix not in _FORMATS:
        raise CorpusError(
            f"cannot tell the format of {path!r} from its extension; set data.format to "
            "text, jsonl or parquet"
        )
    return _FORMATS[suffix]


def plan_shards(data: DataConfig) -> list[Shard]:
    """List the shards of the corpus in a stable order; errors name the path."""
    shards: list[Shard] = []
    for pattern in data.paths:
        files = _expand(pattern)
        if not files:
            raise CorpusError(f"data.paths entry {pattern!r} matches no file")
        for path in files:
            kind = _format_of(path, data.format)
            if kind == "parquet":
                try:
                    groups = _open_parquet(path).metadata.num_row_groups
                except (OSError, ValueError) as error:
                    raise CorpusError(f"{path}: not a readable Parquet file ({error})") from None
                shards.extend(Shard(len(shards) + g, path, kind, g) for g in range(groups))
            else:
                shards.append(Shard(len(shards), path, kind))
    return shards


def _open_parquet(path: str) -> pq.ParquetFile:
    filesystem, inner = open_filesystem(path)
    return pq.ParquetFile(filesystem.open_input_file(inner))


def _read_text(path: str) -> str:
    filesystem, inner = open_filesystem(path)
    try:
        with filesystem.open_input_stream(inner) as stream:
            raw = stream.read()
    except OSError as error:
        raise CorpusError(f"{path}: cannot be read ({error})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CorpusError(f"{path}: not valid UTF-8 at byte {error.start}") from None


def read_documents(shard: Shard, data: DataConfig) -> Iterator[Document]:
    """The documents of one shard, with stable ids."""
    if shard.format == "text":
        yield Document(shard.path, _read_text(shard.path), None)
        return
    if shard.format == "jsonl":
        for line_number, line in enumerate(_read_text(shard.path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CorpusError(
                    f"{shard.path}:{line_number}: not valid JSON ({error.msg})"
                ) from None
            yield _document(
                record, f"{shard.path}#{line_number}", data, f"{shard.path}:{line_number}"
            )
        return
    try:
        table = _open_parquet(shard.path).read_row_group(shard.row_group)
    except (OSError, ValueError) as error:
        raise CorpusError(f"{shard.name}: not a readable Parquet row group ({error})") from None
    for row_number, record in enumerate(table.to_pylist()):
        where = f"{shard.name} row {row_number}"
        yield _document(record, f"{shard.name}#{row_number}", data, where)


def _document(record: object, default_id: str, data: DataConfig, where: str) -> Document:
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected an object with a {data.text_field!r} field")
    text = record.get(data.text_field)
    if not isinstance(text, str):
        raise CorpusError(
            f"{where}: field {data.text_field!r} (data.text_field) is "
            f"{'missing' if text is None else type(text).__name__}, not text"
        )
    doc_id = str(record[data.id_field]) if data.id_field and data.id_field in record else default_id
    if data.id_field and data.id_field not in record:
        raise CorpusError(f"{where}: field {data.id_field!r} (data.id_field) is missing")
    domain = record.get(data.domain_field) if data.domain_field else None
    return Document(doc_id, text, None if domain is None else str(domain))
