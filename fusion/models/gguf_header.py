"""What `validate` and `estimate` need from a GGUF file, read from its header alone.

A GGUF file starts with key-value metadata (architecture, context length, the tokenizer's
token list...) and a table of tensor shapes; the weights follow. Reading only that part takes
a fraction of a second where a full reader parses every token string into Python objects
(~10 s for a 262k vocabulary). Layout: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import importlib.util
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from fusion.errors import FusionError

_MAGIC = b"GGUF"
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
_EMBEDDINGS = ("token_embd.weight", "output.weight")  # [hidden, vocab] in GGUF's order
GGUF_PACKAGES = ("gguf", "accelerate")  # transformers reads GGUF files with these


class GGUFError(FusionError):
    """A GGUF file that cannot be read, or the packages to read one are missing."""


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF model's architecture, window, output vocabulary and parameter count."""

    architecture: str
    context_length: int | None
    vocab_size: int
    parameters: int


def require_gguf_packages(field: str) -> None:
    """Refuse, in one line, to go on with a GGUF model when transformers cannot read it."""
    missing = [name for name in GGUF_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise GGUFError(
            f"{field} is a GGUF model, which needs the Python package(s) {', '.join(missing)}: "
            "pip install 'fusion[gguf]'"
        )


class _Cursor:
    def __init__(self, buffer: mmap.mmap):
        self.buffer, self.at = buffer, 0

    def take(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self.buffer, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.take("Q")
        self.at += length
        return bytes(self.buffer[self.at - length : self.at]).decode("utf-8", "replace")

    def value(self, kind: int):
        """A scalar or string; an array is skipped and stands as its length."""
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            return self.take(_SCALARS[kind])
        inner, count = self.take("I"), self.take("Q")
        if inner == _STRING:
            for _ in range(count):
                length = self.take("Q")  # read before `at` moves past it
                self.at += length
        elif inner == _ARRAY:  # each element an array of its own: its type, count, values
            for _ in range(count):
                self.value(_ARRAY)
        else:
            self.at += count * struct.calcsize(_SCALARS[inner])
        return count


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """The header of the GGUF file at ``path`` (no weight is read)."""
    try:
        with (
            open(path, "rb") as stream,
            mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as m,
        ):
            if m[:4] != _MAGIC:
                raise GGUFError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
            cursor = _Cursor(m)
            cursor.at = 8  # magic, version
            tensors, keys = cursor.take("Q"), cursor.take("Q")
            metadata = {}
            for _ in range(keys):
                key = cursor.string()
                metadata[key] = cursor.value(cursor.take("I"))
            shapes = {}
            for _ in range(tensors):
                name = cursor.string()
                dims = [cursor.take("Q") for _ in range(cursor.take("I"))]
                cursor.at += 4 + 8  # type, offset
                shapes[name] = dims
    except (OSError, ValueError, struct.error, KeyError) as error:
        raise GGUFError(f"{path}: not a readable GGUF file ({error})") from None
    architecture = str(metadata.get("general.architecture", ""))
    parameters = 0
    for dims in shapes.values():
        count = 1
        for dim in dims:
            count *= dim
        parameters += count
    embedding = next((shapes[name] for name in _EMBEDDINGS if name in shapes), None)
    vocab = embedding[-1] if embedding else metadata.get("tokenizer.ggml.tokens", 0)
    context = metadata.get(f"{architecture}.context_length")
    return GGUFHeader(
        architecture=architecture,
        context_length=int(context) if context is not None else None,
        vocab_size=int(vocab),
        parameters=parameters,
    )
