"""The materialised data set on disk: part files, their sidecars, run.json and manifest.json.

Layout: ``data/part-*.parquet`` (what readers open: ``pyarrow.parquet.read_table(DIR/data)``),
``commits/part-*.parquet.json`` (one sidecar per part), ``run.json`` and ``manifest.json``.

Commit protocol, so that a kill at any moment leaves nothing a later run would trust: a part
is written under a hidden temporary name and moved into place, then its sidecar (rows, ids,
shards, checksum) is written the same way. The sidecar is the commit: a part without one is
deleted on the next run. ``run.json`` pins the config fingerprint before any part is written;
``manifest.json`` is written last, when every shard is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fusion.data.corpus import open_filesystem
from fusion.errors import FusionError

RUN_FILE = "run.json"
MANIFEST = "manifest.json"
DATA = "data"
COMMITS = "commits"
PART_PREFIX = "part-"


class OutputError(FusionError):
    """An output folder that cannot take this run."""


def _write_atomically(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file, then a rename.

    A failed write (a full disk, a quota, a lost mount) removes its temporary file and
    becomes an OutputError naming the file, so nothing half-written is left to trust.
    """
    folder, name = path.rsplit("/", 1)
    temporary = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        with filesystem.open_output_stream(temporary) as stream:
            stream.write(data)
        filesystem.move(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            filesystem.delete_file(temporary)
        reason = " ".join(str(error).split())
        raise OutputError(f"could not write {path} ({len(data):,} bytes): {reason}") from None


def _read(filesystem: pafs.FileSystem, path: str) -> bytes:
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


@dataclass
class Progress:
    """What earlier runs finished: ids already written, per shard, and each shard's size."""

    done_ids: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    shard_totals: dict[int, int] = field(default_factory=dict)
    parts: list[dict] = field(default_factory=list)

    def complete_shards(self) -> set[int]:
        return {s for s, total in self.shard_totals.items() if len(self.done_ids[s]) >= total}


class OutputDir:
    """One run's output folder, local or any URI pyarrow understands."""

    def __init__(self, path: str):
        self.path = path.rstrip("/")
        self.filesystem, self.root = open_filesystem(self.path)

    def _file(self, name: str) -> str:
        return str(PurePosixPath(self.root) / name)

    def claim(self, fingerprint: str, resolved: dict, *, overwrite: bool = False) -> None:
        """Pin this run's fingerprint; refuse a folder that holds another run's data."""
        self.filesystem.create_dir(self.root, recursive=True)
        run_file = self._file(RUN_FILE)
        if self.filesystem.get_file_info(run_file).type == pafs.FileType.File:
            earlier = json.loads(_read(self.filesystem, run_file))
            if earlier.get("fingerprint") != fingerprint:
                if not overwrite:
                    raise OutputError(
                        f"output.dir {self.path!r} holds another run (config fingerprint "
                        f"{earlier.get('fingerprint')}, this one {fingerprint}); choose another "
                        "folder, or pass --overwrite to delete it"
                    )
                self.filesystem.delete_dir_contents(self.root)
        elif self._entries() and not overwrite:
            raise OutputError(
                f"output.dir {self.path!r} is not empty and holds no fusion run; choose an "
                "empty folder, or pass --overwrite to delete its contents"
            )
        elif overwrite:
            self.filesystem.delete_dir_contents(self.root)
        self.ensure_folders()
        payload = {"fingerprint": fingerprint, "config": resolved}
        _write_atomically(self.filesystem, run_file, json.dumps(payload, indent=2).encode())

    def _entries(self) -> list[pafs.FileInfo]:
        return self.filesystem.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))

    def _listing(self, folder: str) -> dict[str, str]:
        """Files directly in ``folder``: name to path."""
        selector = pafs.FileSelector(folder, recursive=False, allow_not_found=True)
        return {
            PurePosixPath(info.path).name: info.path
            for info in self.filesystem.get_file_info(selector)
            if info.type == pafs.FileType.File
        }

    def progress(self) -> Progress:
        """Read the sidecars of committed parts; delete uncommitted parts and temporaries."""
        parts, commits = self._listing(self._file(DATA)), self._listing(self._file(COMMITS))
        for name, path in [*parts.items(), *commits.items()]:
            orphan_part = name.endswith(".parquet") and f"{name}.json" not in commits
            orphan_commit = name.endswith(".parquet.json") and name[:-5] not in parts
            if name.endswith(".tmp") or orphan_part or orphan_commit:
                self.filesystem.delete_file(path)
        progress = Progress()
        for name, path in sorted(commits.items()):
            if not name.endswith(".parquet.json") or name[:-5] not in parts:
                continue
            sidecar = json.loads(_read(self.filesystem, path))
            progress.parts.append(sidecar)
            for shard, ids in sidecar["ids"].items():
                progress.done_ids[int(shard)].update(ids)
            for shard, total in sidecar["shard_totals"].items():
                progress.shard_totals[int(shard)] = total
        return progress

    def write_part(
        self,
        table: pa.Table,
        shards: list[int],
        shard_totals: dict[int, int],
        *,
        teacher_counts: dict | None = None,
        nodes: list[str] | None = None,
    ) -> dict:
        """Write one committed part (Parquet file, then its sidecar); return the sidecar."""
        ids = table.column("id").to_pylist()
        digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()
        name = f"{PART_PREFIX}{digest[:16]}"
        buffer = pa.BufferOutputStream()
        collector: list = []
        pq.write_table(table, buffer, compression="zstd", metadata_collector=collector)
        data = buffer.getvalue().to_pybytes()
        _write_atomically(self.filesystem, self._file(f"{DATA}/{name}.parquet"), data)
        by_shard: dict[str, list[str]] = defaultdict(list)
        for row_id, shard in zip(ids, shards, strict=True):
            by_shard[str(shard)].append(row_id)
        sidecar = {
            "file": f"{DATA}/{name}.parquet",
            "rows": table.num_rows,
            "tokens": _tokens(table),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "column_bytes": _column_bytes(collector[0]),
            "ids": dict(by_shard),
            "shard_totals": {str(s): shard_totals[s] for s in sorted(set(shards))},
            "teacher_counts": teacher_counts or {},
        }
        if nodes:
            sidecar["nodes"] = nodes
        _write_atomically(
            self.filesystem,
            self._file(f"{COMMITS}/{name}.parquet.json"),
            json.dumps(sidecar).encode(),
        )
        return sidecar

    def ensure_folders(self) -> None:
        """Create the folder with its ``data`` and ``commits`` (a store written part by part)."""
        for folder in (DATA, COMMITS):
            self.filesystem.create_dir(self._file(folder), recursive=True)

    def write_json(self, name: str, payload: dict) -> None:
        """Write ``name`` in the folder whole or not at all."""
        _write_atomically(self.filesystem, self._file(name), json.dumps(payload, indent=2).encode())

    def read_json(self, name: str) -> dict | None:
        """``name`` in the folder, or None where there is none."""
        path = self._file(name)
        if self.filesystem.get_file_info(path).type != pafs.FileType.File:
            return None
        return json.loads(_read(self.filesystem, path))

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """The Parquet file ``name`` of the folder (e.g. a part's ``data/part-….parquet``)."""
        with self.filesystem.open_input_file(self._file(name)) as stream:
            return pq.read_table(stream, columns=columns)

    def remove(self, name: str) -> None:
        """Delete ``name`` (a file or a folder) in the folder, if it is there."""
        path = self._file(name)
        kind = self.filesystem.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            self.filesystem.delete_dir(path)
        elif kind == pafs.FileType.File:
            self.filesystem.delete_file(path)

    def write_manifest(self, manifest: dict) -> None:
        _write_atomically(
            self.filesystem, self._file(MANIFEST), json.dumps(manifest, indent=2).encode()
        )

    def manifest(self) -> dict | None:
        return self.read_json(MANIFEST)


def join(folder: str, name: str) -> str:
    """``name`` inside ``folder``, a local path or a URI (whose query, if any, stays last)."""
    folder = str(folder)
    base, mark, query = folder.partition("?") if "://" in folder else (folder, "", "")
    return f"{base.rstrip('/')}/{name}{mark}{query}"


def complete_manifest(folder: str | Path, error: type[FusionError], hint: str) -> dict:
    """The manifest of a finished data set (local or URI); ``error`` says so with ``hint``
    if missing."""
    manifest = OutputDir(str(folder)).manifest()
    if manifest is None:
        raise error(f"{folder} holds no complete prepared data set (no {MANIFEST}): {hint}")
    return manifest


def _tokens(table: pa.Table) -> int:
    """Tokens of a part's rows (0 for a part of teacher columns only, which has no ids)."""
    if "input_ids" not in table.column_names:
        return 0
    return int(pa.compute.sum(pa.compute.list_value_length(table["input_ids"])).as_py() or 0)


def _column_bytes(metadata: pq.FileMetaData) -> dict[str, int]:
    """Compressed bytes per column group (``coder.topk_ids`` counts towards ``coder``)."""
    sizes: dict[str, int] = defaultdict(int)
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for column in range(row_group.num_columns):
            chunk = row_group.column(column)
            sizes[chunk.path_in_schema.split(".")[0]] += chunk.total_compressed_size
    return dict(sizes)
