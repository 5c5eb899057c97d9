"""Reading the corpus: planning shards and yielding documents, local or remote.

A shard is the unit of resumable work: a text file, a byte range of a JSONL file (large files
are split at ``data.shard_mb``; a line belongs to the range holding its first byte), a whole
compressed file, or one row group of a Parquet file. Shards are listed by the driver (paths
and sizes only, never the data); documents are read inside Ray tasks. Every document gets a
stable id: the configured id field, or its file and line (row, or byte offset in a split file).
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

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
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".lz4": "lz4"}
_READ_AHEAD = 1 << 16  # bytes read at a time past a range's end to finish its last line


class CorpusError(FusionError):
    """A corpus file or document that cannot be read as configured."""


@dataclass(frozen=True)
class Shard:
    """One unit of work: a file, a byte range ``[start, end)`` of a JSONL file, or a Parquet
    row group; ``size`` is its bytes on storage (for progress)."""

    index: int
    path: str
    format: str
    row_group: int | None = None
    start: int = 0
    end: int | None = None  # None: to the end of the file
    size: int = 0

    @property
    def name(self) -> str:
        if self.row_group is not None:
            return f"{self.path}@{self.row_group}"
        if self.end is not None:
            return f"{self.path}@{self.start}-{self.end}"
        return self.path

    def descriptor(self) -> dict:
        """The shard as a flat row (what Ray Data carries to the reading stage)."""
        return {
            "index": self.index,
            "path": self.path,
            "format": self.format,
            "row_group": -1 if self.row_group is None else self.row_group,
            "start": self.start,
            "end": -1 if self.end is None else self.end,
            "size": self.size,
        }

    @classmethod
    def from_descriptor(cls, row: dict) -> Shard:
        return cls(
            index=int(row["index"]),
            path=str(row["path"]),
            format=str(row["format"]),
            row_group=None if int(row["row_group"]) < 0 else int(row["row_group"]),
            start=int(row["start"]),
            end=None if int(row["end"]) < 0 else int(row["end"]),
            size=int(row["size"]),
        )


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


def compression_of(path: str) -> str | None:
    """The compression a file's last extension names (``.gz``, ``.zst``, ...), if any."""
    return COMPRESSIONS.get(PurePosixPath(path.split("?", 1)[0]).suffix.lower())


def _data_suffix(path: str) -> str:
    """The extension that names the format, under a compression extension."""
    name = PurePosixPath(path.split("://", 1)[-1].split("?", 1)[0])
    if name.suffix.lower() in COMPRESSIONS:
        name = name.with_suffix("")
    return name.suffix.lower()


def _glob_regex(pattern: str) -> re.Pattern:
    """A regular expression for a glob: ``*`` and ``?`` within one folder, ``**`` across."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            close = pattern.index("]", i + 1)
            body = pattern[i + 1 : close]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = close + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _expand_uri(pattern: str) -> list[str]:
    """Files named by a URI: a file, a folder (every corpus file under it) or a glob, listed
    through the filesystem's own listing. A ``?`` after the path starts the URI's query
    (e.g. ``?endpoint_override=...``), which every listed file keeps."""
    uri, _, query = pattern.partition("?")
    scheme, rest = uri.split("://", 1)
    suffix = f"?{query}" if query else ""
    wildcard = next((i for i, ch in enumerate(rest) if ch in "*["), None)
    if wildcard is None:
        filesystem, inner = pafs.FileSystem.from_uri(uri + suffix)
        info = filesystem.get_file_info(inner)
        if info.type == pafs.FileType.File:
            return [pattern]
        if info.type != pafs.FileType.Directory:
            return []
        matches = lambda path: _data_suffix(path) in _FORMATS  # noqa: E731
    else:
        base = rest[: rest.rfind("/", 0, wildcard) + 1] or "/"
        filesystem, inner = pafs.FileSystem.from_uri(f"{scheme}://{base}{suffix}")
        regex = _glob_regex(rest[len(base) :])
        root = inner.rstrip("/") + "/"
        matches = lambda path: bool(regex.match(path[len(root) :]))  # noqa: E731
    selector = pafs.FileSelector(inner, recursive=True, allow_not_found=True)
    listing = filesystem.get_file_info(selector)
    prefix = f"{scheme}://"
    return sorted(
        f"{prefix}{item.path}{suffix}"
        for item in listing
        if item.type == pafs.FileType.File and matches(item.path)
    )


def _expand(pattern: str) -> list[str]:
    """Files named by a path, folder or glob, local or URI."""
    if "://" in pattern:
        return _expand_uri(pattern)
    if any(ch in pattern for ch in "*?["):
        return sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    path = Path(pattern)
    if path.is_dir():
        return sorted(
            str(p) for p in path.rglob("*") if p.is_file() and _data_suffix(str(p)) in _FORMATS
        )
    return [str(path)] if path.exists() else []


def _format_of(path: str, configured: str) -> str:
    if configured != "auto":
        return configured
    suffix = _data_suffix(path)
    if suffix not in _FORMATS:
        raise CorpusError(
            f"cannot tell the format of {path!r} from its extension; set data.format to "
            "text, jsonl or parquet"
        )
    return _FORMATS[suffix]


def plan_shards(data: DataConfig) -> list[Shard]:
    """List the shards of the corpus in a stable order; errors name the path."""
    shards: list[Shard] = []
    split = int(data.shard_mb * (1 << 20))
    for pattern in data.paths:
        files = _expand(pattern)
        if not files:
            raise CorpusError(f"data.paths entry {pattern!r} matches no file")
        for path in files:
            kind = _format_of(path, data.format)
            if kind == "parquet":
                try:
                    metadata = _open_parquet(path).metadata
                except (OSError, ValueError) as error:
                    raise CorpusError(f"{path}: not a readable Parquet file ({error})") from None
                for group in range(metadata.num_row_groups):
                    size = metadata.row_group(group).total_byte_size
                    shards.append(Shard(len(shards), path, kind, group, size=size))
                continue
            filesystem, inner = open_filesystem(path)
            size = filesystem.get_file_info(inner).size or 0
            if kind == "jsonl" and compression_of(path) is None and size > split:
                for start in range(0, size, split):
                    end = min(start + split, size)
                    shard = Shard(len(shards), path, kind, start=start, end=end, size=end - start)
                    shards.append(shard)
            else:
                shards.append(Shard(len(shards), path, kind, size=size))
    return shards


def _open_parquet(path: str) -> pq.ParquetFile:
    filesystem, inner = open_filesystem(path)
    return pq.ParquetFile(filesystem.open_input_file(inner))


def _read_bytes(path: str) -> bytes:
    """A whole file, decompressed when its extension names a compression."""
    filesystem, inner = open_filesystem(path)
    try:
        with filesystem.open_input_stream(inner, compression=compression_of(path)) as stream:
            return stream.read()
    except OSError as error:
        raise CorpusError(f"{path}: cannot be read ({error})") from None


def _read_range(path: str, start: int, end: int) -> tuple[int, bytes]:
    """The lines whose first byte lies in ``[start, end)``: their first byte's offset and
    their bytes (the last line read on past ``end`` to its newline)."""
    filesystem, inner = open_filesystem(path)
    try:
        with filesystem.open_input_file(inner) as file:
            begin = max(start - 1, 0)  # the byte before: is ``start`` itself a line start?
            file.seek(begin)
            raw = file.read(end - begin)
            if start > 0:
                newline = raw.find(b"\n")
                if newline < 0:
                    return end, b""  # one line runs through the whole range: not ours
                raw, begin = raw[newline + 1 :], begin + newline + 1
            while raw and not raw.endswith(b"\n"):
                more = file.read(_READ_AHEAD)
                if not more:
                    break
                newline = more.find(b"\n")
                raw += more if newline < 0 else more[: newline + 1]
                if newline >= 0:
                    break
            return begin, raw
    except OSError as error:
        raise CorpusError(f"{path}: cannot be read ({error})") from None


def _decode(raw: bytes, path: str, offset: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CorpusError(f"{path}: not valid UTF-8 at byte {offset + error.start}") from None


def read_documents(shard: Shard, data: DataConfig) -> Iterator[Document]:
    """The documents of one shard, with stable ids."""
    if shard.format == "text":
        yield Document(shard.path, _decode(_read_bytes(shard.path), shard.path), None)
        return
    if shard.format == "jsonl":
        yield from _jsonl_documents(shard, data)
        return
    try:
        table = _open_parquet(shard.path).read_row_group(shard.row_group)
    except (OSError, ValueError) as error:
        raise CorpusError(f"{shard.name}: not a readable Parquet row group ({error})") from None
    for row_number, record in enumerate(table.to_pylist()):
        where = f"{shard.name} row {row_number}"
        yield _document(record, f"{shard.name}#{row_number}", data, where)


def _jsonl_documents(shard: Shard, data: DataConfig) -> Iterator[Document]:
    """A JSONL shard's documents: ids ``file#line`` for a whole file, ``file@byte`` (the
    line's first byte) for a byte range of a split one."""
    if shard.end is None:
        begin, raw = 0, _read_bytes(shard.path)
    else:
        begin, raw = _read_range(shard.path, shard.start, shard.end)
    offset = begin
    for line_number, line in enumerate(raw.split(b"\n"), start=1):
        line_offset, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        if shard.end is None:
            where, default_id = f"{shard.path}:{line_number}", f"{shard.path}#{line_number}"
        else:
            where, default_id = f"{shard.path}:byte {line_offset}", f"{shard.path}@{line_offset}"
        text = _decode(line, shard.path, line_offset)
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise CorpusError(f"{where}: not valid JSON ({error.msg})") from None
        yield _document(record, default_id, data, where)


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
