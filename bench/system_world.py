"""A second world for the multi-source bench, from text the project's environment pins (not
the demo's standard library):

* ``cpp``: the C++ headers torch ships (``torch/include``: c10, ATen, torch's API);
* ``readme``: the descriptions of every installed distribution (``*.dist-info/METADATA``
  bodies: Markdown and reStructuredText prose);
* ``json``: botocore's service models (``botocore/data/**/service-2.json(.gz)``: JSON with
  English documentation strings).

Its three experts have the demo's architectures and tokenizer kinds, each pre-trained mostly on
one domain; its target is pre-trained briefly on an even mix. Every tenth file is held out.
"""

from __future__ import annotations

import gzip
import random
import sysconfig
from collections.abc import Callable
from pathlib import Path

from fusion.demo.corpora import Corpora, spans_of
from fusion.demo.world import TARGET, ModelSpec, Scale, World, build_world

DOMAINS = ("cpp", "readme", "json")
HELD_OUT_EVERY = 10
SOURCES = (
    ModelSpec("cpp_expert", "gpt2", "bytes4096", {"cpp": 8, "readme": 1, "json": 1}, "expert"),
    ModelSpec(
        "readme_expert", "gpt_neox", "meta4096", {"cpp": 1, "readme": 8, "json": 1}, "expert"
    ),
    ModelSpec("json_expert", "llama", "bytes2048", {"cpp": 1, "readme": 1, "json": 8}, "expert"),
)
WORLD_TARGET = ModelSpec(
    TARGET.name, "llama", "target3072", {"cpp": 1, "readme": 1, "json": 1}, "target"
)


def _site() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _files(domain: str) -> list[tuple[str, str]]:
    """(name, text) of one domain's files, in a fixed order."""
    site = _site()
    if domain == "cpp":
        paths = sorted((site / "torch" / "include").rglob("*.h"))
        return [(str(p.relative_to(site)), p.read_text(errors="replace")) for p in paths]
    if domain == "readme":
        found = []
        for path in sorted(site.glob("*.dist-info/METADATA")):
            _, _, body = path.read_text(errors="replace").partition("\n\n")
            if len(body) > 200:
                found.append((path.parent.name, body))
        return found
    found = []
    for path in sorted((site / "botocore" / "data").rglob("service-2.json*")):
        raw = path.read_bytes()
        text = gzip.decompress(raw).decode() if path.suffix == ".gz" else raw.decode()
        found.append((str(path.relative_to(site)), text))
    return found


def build_corpora(chars: int, held_out_chars: int, seed: int) -> Corpora:
    """Up to ``chars`` of training text per domain (30 % of its spans for continual training),
    ``held_out_chars`` of held-out spans from every tenth file."""
    rng = random.Random(seed)
    pretrain, continual, held_out = {}, {}, {}
    for domain in DOMAINS:
        files = _files(domain)
        random.Random(seed).shuffle(files)
        train, held, used = [], [], 0
        for index, (_, text) in enumerate(files):
            if index % HELD_OUT_EVERY == 0:
                held.extend(spans_of(text))
            elif used < chars:
                train.extend(spans_of(text))
                used += len(text)
        rng.shuffle(train)
        cut = int(len(train) * 0.7)
        pretrain[domain], continual[domain] = train[:cut], train[cut:]
        random.Random(seed + 3).shuffle(held)
        kept, size = [], 0
        for span in held:
            if size >= held_out_chars:
                break
            kept.append(span)
            size += len(span)
        held_out[domain] = kept
    return Corpora(pretrain, continual, held_out)


def build_system_world(
    root: Path, scale: Scale, *, echo: Callable[[str], None] = print, held_out_chars: int
) -> World:
    """The world of :data:`DOMAINS` at ``scale`` (its experts' steps, widths and budget)."""
    corpora = build_corpora(scale.code_chars, held_out_chars, scale.seed)
    return build_world(root, scale, echo=echo, corpora=corpora, models=(*SOURCES, WORLD_TARGET))
