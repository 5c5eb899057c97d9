"""Stage 3, alignment across tokenizers: vocabulary maps (exact, MinED), sequence
alignment (character offsets, DTW), top-k transfer into target ids, and the byte
projection. Takes two tokenizations of one text; gives the source's distributions in
target positions and ids."""

from fusion.align.alignment import Alignment
from fusion.align.dtw import dtw_align
from fusion.align.markers import detect_marker, translate_marker
from fusion.align.offsets import offset_align
from fusion.align.transfer import PAD_ID, VocabBridge, transfer_topk
from fusion.align.vocab import exact_vocab_map, mined_vocab_map

__all__ = [
    "PAD_ID",
    "Alignment",
    "VocabBridge",
    "detect_marker",
    "dtw_align",
    "exact_vocab_map",
    "mined_vocab_map",
    "offset_align",
    "transfer_topk",
    "translate_marker",
]
