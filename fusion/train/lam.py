"""``train.lam: auto``: λ from what the teacher knows beyond the target.

The manifest of a prepared data set holds the teacher's bits per byte as stored in target ids
and the target's own on the same text (``fusion inspect``). Their ratio says how much the
teacher can teach: a teacher no better than the target should weigh little (λ 0.9, the
paper's); one far better should weigh as much as the labels (λ 0.5). Between, λ falls with
the share of the target's bits the teacher saves, ``gain = 1 − teacher / target``:
``λ = clip(0.9 − gain, 0.5, 0.9)``. Measured on two worlds with `bench/multi_source.py`.

A teacher fused per token (MinCE per position) is chosen by the label at every position, so its
stored bits per byte says how often some candidate held the label, not what the target can learn
(1.02 against 2.48 per sequence on the same candidates): there ``auto`` reads the best candidate
other than the target instead.
"""

from __future__ import annotations

from fusion.errors import FusionError
from fusion.teacher.rows import FUSED, TARGET

HIGHEST, LOWEST = 0.9, 0.5


class LamError(FusionError):
    """``train.lam: auto`` without the figures it is chosen from."""


def lam_from_fidelity(teacher_bpb: float, target_bpb: float) -> float:
    """λ for a teacher of ``teacher_bpb`` bits per byte (stored) and a target of
    ``target_bpb`` (its own, on the same text)."""
    if teacher_bpb <= 0 or target_bpb <= 0:
        raise ValueError(f"bits per byte must be positive, got {teacher_bpb} and {target_bpb}")
    gain = 1.0 - teacher_bpb / target_bpb
    return round(min(HIGHEST, max(LOWEST, HIGHEST - gain)), 4)


def auto_lam(manifest: dict, teacher: str, folder: str) -> tuple[float, str]:
    """λ for ``teacher`` of the data set whose ``manifest`` this is, and a line saying why."""
    found = manifest.get("diagnostics", {})
    candidates = found.get("candidates", {})
    own = candidates.get(TARGET, {}).get("own_bits_per_byte")
    if own is None:
        raise LamError(
            f"train.lam: 'auto' compares the teacher with the target's own bits per byte, which "
            f"{folder} lacks (prepared with target.as_teacher: false, or by an older fusion): "
            "set train.lam to a number"
        )
    per_position = manifest.get("config", {}).get("fuse", {}).get("granularity") == "token"
    if teacher == FUSED and per_position:
        stored_by = {
            name: c["bits_per_byte"]
            for name, c in candidates.items()
            if name != TARGET and c.get("bits_per_byte") is not None
        }
        if not stored_by:
            raise LamError(f"train.lam: 'auto': {folder} has no source with stored bits per byte")
        teacher = min(stored_by, key=stored_by.__getitem__)
        reading = f"best source {teacher!r} (the fused teacher is chosen by the label per token)"
        stored = stored_by[teacher]
    else:
        reading = f"{teacher} teacher"
        stored = (found.get(FUSED, {}) if teacher == FUSED else candidates.get(teacher, {})).get(
            "bits_per_byte"
        )
    if stored is None:
        raise LamError(f"train.lam: 'auto': {folder} has no stored bits per byte for {teacher!r}")
    lam = lam_from_fidelity(stored, own)
    return lam, (
        f"train.lam auto: {lam} (the {reading}: {stored:.3f} bits/byte as stored "
        f"against the target's own {own:.3f})"
    )
