"""The demo's three domains, built from text every Python installation carries.

* ``code``: the standard library's top-level modules;
* ``prose``: their docstrings and the ``pydoc`` help topics (English technical prose);
* ``arith``: generated lines ``a op b = c``.

Every tenth module (its code *and* its docstrings) and every tenth topic is held out, so no
held-out text is seen in training. Text is cut into spans of at most ``SPAN_CHARS`` characters
(fewer for arithmetic) at line breaks; the training spans are split into a pre-training part
(for the experts and the target's initial model) and a disjoint continual-training part (the
fusion corpus).
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

DOMAINS = ("code", "prose", "arith")
SPAN_CHARS = 320
# Every digit is a token of its own, so arithmetic has about one token per character: shorter
# spans keep its sequences as long (in tokens) as code and prose, and batches free of padding.
SPAN_CHARS_BY_DOMAIN = {"code": SPAN_CHARS, "prose": SPAN_CHARS, "arith": 96}
HELD_OUT_EVERY = 10


@dataclass(frozen=True)
class Corpora:
    """Spans per domain for pre-training, continual training and evaluation."""

    pretrain: dict[str, list[str]]
    continual: dict[str, list[str]]
    held_out: dict[str, list[str]]


def spans_of(text: str, limit: int = SPAN_CHARS) -> list[str]:
    """Cut ``text`` into spans of at most ``limit`` characters, at line breaks where possible."""
    spans, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > limit:
            if current:
                spans.append(current)
                current = ""
            spans.append(line[:limit])
            line = line[limit:]
        if len(current) + len(line) > limit:
            spans.append(current)
            current = ""
        current += line
    if current:
        spans.append(current)
    return [span for span in spans if span.strip()]


def _modules() -> list[tuple[str, str]]:
    """(name, source) of the standard library's top-level modules that parse."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        modules.append((path.name, source))
    return modules


def _docstrings(source: str) -> list[str]:
    """The module's, classes' and functions' docstrings of at least 80 characters."""
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, nodes) and (doc := ast.get_docstring(node)) and len(doc) >= 80:
            found.append(doc + "\n")
    return found


def _arithmetic(rng: random.Random, lines: int) -> str:
    """Seeded lines ``a op b = c``: sums and differences to 999, products to 30 × 12."""
    out = []
    for _ in range(lines):
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(0, 30), rng.randint(0, 12)
            value = a * b
        else:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            value = a + b if op == "+" else a - b
        out.append(f"{a} {op} {b} = {value}\n")
    return "".join(out)


def build_corpora(
    *, code_chars: int, arith_lines: int, held_out_chars: int, continual_share: float, seed: int
) -> Corpora:
    """Split the three domains into pre-training, continual and held-out spans (deterministic)."""
    import pydoc_data.topics

    rng = random.Random(seed)
    train_text: dict[str, list[str]] = {"code": [], "prose": []}
    held_text: dict[str, list[str]] = {"code": [], "prose": []}
    used = 0
    for index, (_, source) in enumerate(_modules()):
        held = index % HELD_OUT_EVERY == 0
        if not held and used >= code_chars:
            continue
        (held_text if held else train_text)["code"].append(source)
        (held_text if held else train_text)["prose"].extend(_docstrings(source))
        used += 0 if held else len(source)
    for index, (_, topic) in enumerate(sorted(pydoc_data.topics.topics.items())):
        (held_text if index % HELD_OUT_EVERY == 0 else train_text)["prose"].append(topic)
    train_text["arith"] = [_arithmetic(random.Random(seed + 1), arith_lines)]
    held_text["arith"] = [_arithmetic(random.Random(seed + 2), arith_lines // 20 + 200)]

    pretrain, continual, held_out = {}, {}, {}
    for domain in DOMAINS:
        limit = SPAN_CHARS_BY_DOMAIN[domain]
        spans = [s for text in train_text[domain] for s in spans_of(text, limit)]
        rng.shuffle(spans)
        cut = int(len(spans) * (1 - continual_share))
        pretrain[domain], continual[domain] = spans[:cut], spans[cut:]
        held = [s for text in held_text[domain] for s in spans_of(text, limit)]
        random.Random(seed + 3).shuffle(held)
        kept, size = [], 0
        for span in held:
            if size >= held_out_chars:
                break
            kept.append(span)
            size += len(span)
        held_out[domain] = kept
    return Corpora(pretrain, continual, held_out)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """Write records as JSON lines (atomically: a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    with partial.open("w", encoding="utf-8") as stream:
        for record in records:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    partial.replace(path)
    return path
