"""`fusion inspect`: what a prepared data set will teach, before any GPU hour is spent on it.

Prints the manifest's teacher diagnostics (per candidate: coverage, how often its top-k holds
the next target token, how often fusion took it; for the fused teacher: positions no
candidate could teach, and its CE against the next target token) and, for one row, every
position side by side: the target's token, each candidate's aligned top-3 and the choice.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

from fusion.data.corpus import open_filesystem
from fusion.errors import FusionError
from fusion.teacher.fuse import MIXED, NO_TEACHER
from fusion.teacher.output import complete_manifest, join
from fusion.teacher.rows import FUSED, candidate_aligned, table_to_batch


class InspectError(FusionError):
    """A folder or row that cannot be inspected."""


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a complete prepared data set, or InspectError saying what is missing."""
    manifest = complete_manifest(
        folder, InspectError, "run `fusion prepare` first, or let it finish"
    )
    if "diagnostics" not in manifest:
        raise InspectError(
            f"{folder}/manifest.json has no teacher diagnostics: it was written by an older "
            "fusion; re-run `fusion prepare` into a new folder"
        )
    return manifest


def summary_lines(manifest: dict) -> list[str]:
    """The diagnostics as a small table."""
    found = manifest["diagnostics"]
    fused = found[FUSED]
    config = manifest["config"]
    lines = [
        f"{manifest['rows']:,} rows, {manifest['tokens']:,} tokens, "
        f"{found['positions']:,} labelled positions; align {config['align']['method']}/"
        f"{config['align']['vocab_map']}/{config['align']['mode']}, fuse "
        f"{config['fuse']['method']} per {config['fuse']['granularity']}",
        "",
        f"{'candidate':<20} {'coverage':>9} {'label in top-k':>15} {'taught':>8} "
        f"{'bits/byte stored':>17} {'own':>7}  kept",
    ]
    for name, stats in found["candidates"].items():
        stored, own = stats.get("bits_per_byte"), stats.get("own_bits_per_byte")
        kept = f"{100 * own / stored:.0f} %" if stored and own else "—"
        lines.append(
            f"{name:<20} {stats['coverage']:>9.3f} {stats['label_in_topk']:>15.3f} "
            f"{stats['taught']:>8.3f} {_figure(stored):>17} {_figure(own):>7}  {kept}"
        )
    lines += [
        "",
        f"fused teacher: no teacher at {fused['no_teacher']:.3f} of positions "
        f"({config['fuse'].get('no_teacher', 'one_hot')}); fallback where a candidate could "
        f"teach: {fused['fallback_over_real']} positions; mixed {fused['mixed']:.3f}; label "
        f"in top-k {fused['label_in_topk']:.3f}",
        f"fused teacher CE against the next target token, over every position it teaches "
        f"(mass outside the top-k counted): {fused['ce_nats_per_token']:.4f} nats/token, "
        f"{_figure(fused.get('bits_per_byte'))} bits/byte",
        "bits/byte stored: each candidate's distribution as stored in target ids, where it "
        "has one; own: the same model in its own tokenization; kept: own / stored",
    ]
    return lines + provenance_lines(manifest)


def provenance_lines(manifest: dict) -> list[str]:
    """Per candidate, when and from what its columns were computed (data sets prepared
    with stored units; an older manifest has none to show)."""
    provenance = manifest.get("provenance")
    if not provenance:
        return []
    lines = ["", "columns computed from (each candidate is a unit of its own):"]
    for name, unit in provenance.items():
        settings = unit.get("settings") or {}
        read = ", ".join(
            f"{key} {settings[key]}" for key in ("dtype", "bos", "backend") if key in settings
        )
        align = settings.get("align") or {}
        files = unit.get("files") or {}
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]
        lines.append(
            f"  {name}: {unit.get('model')} ({len(files)} files, sha256 {digest}); {read}; "
            f"align {align.get('method')} top-{align.get('top_k')}; computed "
            f"{unit.get('started')} – {unit.get('completed')}, {unit.get('rows')} rows; unit "
            f"{unit.get('fingerprint')}"
        )
        if nodes := unit.get("nodes"):
            shown = ", ".join(node[:12] for node in nodes)
            lines.append(f"    read on {len(nodes)} Ray node{'s' * (len(nodes) > 1)}: {shown}")
    return lines


def _figure(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _show(token: str, width: int = 12) -> str:
    shown = repr(token)[1:-1]
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def row_lines(folder: str | Path, manifest: dict, row_id: str, positions: int) -> list[str]:
    """One row side by side: target token, next token, each candidate's top-3, the choice."""
    from fusion.models.loading import load_tokenizer

    filesystem, root = open_filesystem(str(folder))
    files = [join(root, f["file"]) for f in manifest["files"]]
    dataset = pads.dataset(files, format="parquet", filesystem=filesystem)
    table = dataset.to_table(filter=pads.field("id") == row_id)
    if table.num_rows == 0:
        raise InspectError(f"no row with id {row_id!r} in {folder}")
    batch = table_to_batch(table)
    tokenizer = load_tokenizer(manifest["config"]["target"]["path"])
    names = manifest["candidates"]
    input_ids = np.asarray(batch["input_ids"][0])
    tokens = tokenizer.convert_ids_to_tokens(input_ids.tolist())
    choice = np.asarray(batch[f"{FUSED}.choice"][0])
    header = f"{'pos':>4} {'token':<12} {'next':<12} " + " ".join(f"{n[:26]:<26}" for n in names)
    lines = [f"row {row_id} ({len(input_ids)} tokens)", header + " fused"]
    for t in range(min(positions, len(input_ids))):
        cells = []
        for name in names:
            ids = np.asarray(batch[f"{name}.topk_ids"][0][t])
            logits = np.asarray(batch[f"{name}.topk_logits"][0][t], dtype=np.float64)
            if not candidate_aligned(batch, name, 0)[t]:
                cells.append(f"{'(fallback)':<26}")
                continue
            kept = ids >= 0
            probs = np.exp(logits[kept] - logits[kept].max())
            probs /= probs.sum()
            top = [
                f"{_show(tokenizer.convert_ids_to_tokens(int(i)), 5)}:{p:.2f}"
                for i, p in zip(ids[kept][:3], probs[:3], strict=False)
            ]
            cells.append(f"{' '.join(top):<26}")
        picked = int(choice[t])
        taken = {MIXED: "mixed", NO_TEACHER: "no teacher"}.get(picked)
        next_token = tokens[t + 1] if t + 1 < len(tokens) else ""
        lines.append(
            f"{t:>4} {_show(tokens[t]):<12} {_show(next_token):<12} "
            + " ".join(cells)
            + f" {taken or names[picked]}"
        )
    return lines


def inspect_lines(folder: str | Path, row_id: str | None = None, positions: int = 40) -> list[str]:
    """What `fusion inspect` prints."""
    manifest = read_manifest(folder)
    lines = summary_lines(manifest)
    if row_id is not None:
        lines += ["", *row_lines(folder, manifest, row_id, positions)]
    return lines
