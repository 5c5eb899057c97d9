"""Writing local files whole or not at all, so a killed run never leaves a half file."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it, then rename it over."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temporary.open("wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8, whole or not at all (see :func:`write_bytes_atomically`)."""
    write_bytes_atomically(path, text.encode("utf-8"))
