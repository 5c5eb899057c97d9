"""Cross-tokenizer alignment: vocabulary maps, sequence alignment, top-k transfer."""

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
