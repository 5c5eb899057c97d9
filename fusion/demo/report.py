"""The demo's report: ``results.json``, ``report.md``, ``bpb.png`` and ``curve.png``.

The verdict is computed from the numbers, never written in advance: whether ``fused`` has the
lowest average bits-per-byte of all models, by how much it beats ``clm_only`` and each
baseline, and how many fewer tokens it needs to reach ``clm_only``'s final held-out bpb.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from fusion.data.files import write_text_atomically


def learning_curve(metrics_file: Path) -> list[tuple[int, float]]:
    """(tokens seen, held-out average bpb) from a training run's ``metrics.jsonl``."""
    points = []
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if "eval_avg_bpb" in record:
            points.append((int(record["tokens_seen"]), float(record["eval_avg_bpb"])))
    return sorted(points)


def tokens_to_reach(curve: Sequence[tuple[int, float]], level: float) -> float | None:
    """Tokens at which ``curve`` first gets to ``level`` (linear between points), or None."""
    for (t0, b0), (t1, b1) in itertools.pairwise(curve):
        if b1 <= level:
            if b0 <= level:
                return float(t0)
            return t0 + (t1 - t0) * (b0 - level) / (b0 - b1)
    return None


def token_efficiency(fused: Sequence[tuple[int, float]], clm: Sequence[tuple[int, float]]) -> dict:
    """How many tokens ``fused`` needs for ``clm``'s final held-out bpb, and the ratio."""
    clm_tokens, clm_final = clm[-1]
    reached = tokens_to_reach(fused, clm_final)
    return {
        "clm_only_final_bpb": clm_final,
        "clm_only_tokens": clm_tokens,
        "fused_tokens_to_match": reached,
        "ratio": None if not reached else clm_tokens / reached,
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def noise_band(
    models: Mapping[str, dict], domains: Sequence[str], second: str, teacher_arm: str
) -> dict:
    """Fused against clm_only over both data orders, and the band one order's change spans.

    The band is the larger of the two arms' |order 1 − order 2| (per domain and on average):
    a difference smaller than it is within what the data order alone moves.
    """

    def orders(name: str, domain: str | None) -> list[float]:
        pick = (lambda e: e["avg_bpb"]) if domain is None else (lambda e: e["bpb"][domain])
        return [pick(models[name]), pick(models[name + second])]

    out = {}
    for domain in [None, *domains]:
        fused, clm = orders("fused", domain), orders("clm_only", domain)
        deltas = [f - c for f, c in zip(fused, clm, strict=True)]
        band = max(abs(fused[0] - fused[1]), abs(clm[0] - clm[1]))
        out[domain or "avg"] = {
            "fused": [round(v, 5) for v in fused],
            "clm_only": [round(v, 5) for v in clm],
            "delta_per_order": [round(d, 5) for d in deltas],
            "delta_mean": round(_mean(deltas), 5),
            "band": round(band, 5),
            "beyond_band": all(d < 0 for d in deltas) and -_mean(deltas) > band,
        }
    teacher = models[teacher_arm]["avg_bpb"]
    vs_teacher = _mean(orders("fused", None)) - teacher
    out["vs_best_single_teacher"] = {
        "arm": teacher_arm,
        "delta_mean": round(vs_teacher, 5),
        "beyond_band": -vs_teacher > out["avg"]["band"],
    }
    return out


def verdict(models: Mapping[str, dict], domains: Sequence[str]) -> dict:
    """Fused against every other model: Δ average bpb (negative: fused is better)."""
    fused = models["fused"]["avg_bpb"]
    deltas = {
        name: round(fused - entry["avg_bpb"], 5)
        for name, entry in models.items()
        if name != "fused"
    }
    per_domain = {
        d: round(models["fused"]["bpb"][d] - models["clm_only"]["bpb"][d], 5) for d in domains
    }
    return {
        "fused_beats_clm_only": deltas["clm_only"] < 0,
        "fused_beats_all": all(delta < 0 for delta in deltas.values()),
        "delta_avg_bpb_vs": deltas,
        "delta_bpb_vs_clm_only_per_domain": per_domain,
        "best_model": min(models, key=lambda name: models[name]["avg_bpb"]),
    }


def _table(models: Mapping[str, dict], domains: Sequence[str], roles: Mapping[str, str]) -> str:
    clm = models["clm_only"]["avg_bpb"]
    head = "| model | role | " + " | ".join(domains) + " | avg | Δ avg vs clm_only |"
    rows = [head, "|" + "---|" * (len(domains) + 4)]
    best = {d: min(m["bpb"][d] for m in models.values()) for d in domains}
    best_avg = min(m["avg_bpb"] for m in models.values())
    for name, entry in sorted(models.items(), key=lambda item: item[1]["avg_bpb"]):
        cells = [
            f"**{entry['bpb'][d]:.4f}**" if entry["bpb"][d] == best[d] else f"{entry['bpb'][d]:.4f}"
            for d in domains
        ]
        avg = entry["avg_bpb"]
        avg_cell = f"**{avg:.4f}**" if avg == best_avg else f"{avg:.4f}"
        rows.append(
            f"| {name} | {roles.get(name, '')} | "
            + " | ".join(cells)
            + f" | {avg_cell} | {avg - clm:+.4f} |"
        )
    return "\n".join(rows)


def _verdict_text(results: dict) -> str:
    v, models = results["verdict"], results["models"]
    delta = v["delta_avg_bpb_vs"]["clm_only"]
    relative = delta / models["clm_only"]["avg_bpb"]
    lines = [
        f"- **fused vs clm_only (same text, same tokens): {delta:+.4f} bpb on average "
        f"({relative:+.2%})** on the first data order — fused is "
        f"{'lower' if delta < 0 else 'not lower'} there.",
        "- per domain vs clm_only: "
        + ", ".join(f"{d} {x:+.4f}" for d, x in v["delta_bpb_vs_clm_only_per_domain"].items()),
    ]
    noise = results.get("noise")
    if noise:
        avg = noise["avg"]
        lines.append(
            f"- **over two data orders: fused − clm_only = {avg['delta_per_order'][0]:+.4f} and "
            f"{avg['delta_per_order'][1]:+.4f} (mean {avg['delta_mean']:+.4f}); one order's own "
            f"change spans {avg['band']:.4f}** — fused "
            + (
                "beats clm_only beyond that band."
                if avg["beyond_band"]
                else "does **not** beat clm_only beyond that band."
            )
        )
        lines.append(
            "- per domain, mean Δ (band): "
            + ", ".join(
                f"{d} {noise[d]['delta_mean']:+.4f} ({noise[d]['band']:.4f})"
                + (" ✓" if noise[d]["beyond_band"] else "")
                for d in results["domains"]
            )
        )
        teacher = noise["vs_best_single_teacher"]
        lines.append(
            f"- against the best single teacher ({teacher['arm']}): fused (mean of both orders) "
            f"{teacher['delta_mean']:+.4f} — "
            + (
                "better beyond the band."
                if teacher["beyond_band"]
                else "not better beyond the band."
            )
        )
    losers = {n: d for n, d in v["delta_avg_bpb_vs"].items() if d >= 0}
    if v["fused_beats_all"]:
        lines.append("- fused has the lowest average bpb of every model in the table.")
    else:
        lines.append(
            f"- fused does **not** beat every model: {', '.join(sorted(losers))} "
            f"{'is' if len(losers) == 1 else 'are'} at least as good on average "
            f"(best: {v['best_model']})."
        )
    eff = results["token_efficiency"]
    if eff["ratio"]:
        lines.append(
            f"- token efficiency: fused reached clm_only's final held-out bpb "
            f"({eff['clm_only_final_bpb']:.4f}) after {eff['fused_tokens_to_match']:,.0f} tokens, "
            f"clm_only after {eff['clm_only_tokens']:,} — **{eff['ratio']:.2f}× fewer tokens**."
        )
    else:
        lines.append(
            f"- token efficiency: fused never reached clm_only's final held-out bpb "
            f"({eff['clm_only_final_bpb']:.4f}) within the budget."
        )
    return "\n".join(lines)


def _teacher_table(teacher_data: Mapping[str, dict]) -> str:
    """Per data set: each candidate's coverage / label-in-top-k / taught share, and the
    fused teacher's no-teacher share and CE."""
    rows = [
        "| data set | candidate: coverage / label in top-k / taught | no teacher | fallback "
        "over a real candidate | fused teacher (bits/byte) |",
        "|---|---|---|---|---|",
    ]
    for name, entry in teacher_data.items():
        found = entry.get("diagnostics")
        if not found:
            continue
        cells = "; ".join(
            f"{c} {v['coverage']:.2f} / {v['label_in_topk']:.2f} / {v['taught']:.2f}"
            for c, v in found["candidates"].items()
        )
        fused = found["fused"]
        rows.append(
            f"| {name} | {cells} | {fused['no_teacher']:.3f} | {fused['fallback_over_real']} | "
            f"{fused['bits_per_byte']:.3f} |"
        )
    return "\n".join(rows)


def write_report(out: Path, results: dict, settings: Mapping[str, object]) -> None:
    """Write ``report.md``, ``bpb.png`` and ``curve.png`` next to ``results.json``."""
    domains = results["domains"]
    roles = results.get("roles", {})
    plot_bpb(out / "bpb.png", results["models"], domains)
    plot_curves(out / "curve.png", results["curves"], results["token_efficiency"])
    lines = [
        "# fusion demo: does knowledge fusion beat its baselines?",
        "",
        "Held-out **bits per byte** (lower is better; comparable across tokenizers), per domain "
        "and averaged over domains. Every trained arm starts from `target_init` and sees the "
        f"same text in the same order: **{results['tokens_per_arm']:,} target tokens** each.",
        "",
        "## Verdict",
        "",
        _verdict_text(results),
        "",
        "## Results",
        "",
        _table(results["models"], domains, roles),
        "",
        "![bits per byte per domain and model](bpb.png)",
        "",
        "![held-out bpb against tokens seen](curve.png)",
        "",
        "## What the teachers held",
        "",
        "Shares of labelled target positions (`fusion inspect` on each data set): coverage = the "
        "candidate has its own aligned distribution there; label in top-k = that distribution "
        "holds the next target token; taught = fusion took it. No teacher = no candidate "
        "could teach the position (it gets the one-hot label).",
        "",
        _teacher_table(results.get("teacher_data", {})),
        "",
        "## Settings",
        "",
        *[f"- **{key}**: {value}" for key, value in settings.items()],
        f"- **wall time**: {results['wall_seconds']:.0f} s "
        + "("
        + ", ".join(f"{k} {v:.0f} s" for k, v in results["phase_seconds"].items())
        + ")",
        "",
        "`fused` and `clm_only` ran on two data orders (`*_order2`); every other arm on one. "
        "Run `fusion demo` without `--quick` for the larger budget and the FuseLLM variants.",
        "",
    ]
    write_text_atomically(out / "report.md", "\n".join(lines))


def plot_bpb(file: Path, models: Mapping[str, dict], domains: Sequence[str]) -> None:
    """One horizontal bar chart per domain (and the average), models sorted by average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(models, key=lambda n: models[n]["avg_bpb"], reverse=True)
    panels = [*domains, "average"]
    figure, axes = plt.subplots(
        1, len(panels), figsize=(3.2 * len(panels) + 1.5, 0.32 * len(names) + 1.6), sharey=True
    )
    for axis, panel in zip(axes, panels, strict=True):
        values = [
            models[n]["avg_bpb"] if panel == "average" else models[n]["bpb"][panel] for n in names
        ]
        colours = [
            "tab:red" if n == "fused" else "tab:blue" if n == "clm_only" else "tab:gray"
            for n in names
        ]
        axis.barh(names, values, color=colours)
        low, high = min(values), max(values)
        axis.set_xlim(low - 0.15 * (high - low) - 1e-3, high + 0.05 * (high - low) + 1e-3)
        axis.set_title(panel)
        axis.set_xlabel("bits per byte")
        axis.grid(axis="x", alpha=0.3)
    figure.suptitle("Held-out bits per byte (lower is better); red: fused, blue: clm_only")
    figure.tight_layout()
    figure.savefig(file, dpi=110)
    plt.close(figure)


def plot_curves(file: Path, curves: Mapping[str, list], efficiency: Mapping[str, object]) -> None:
    """Held-out average bpb against tokens seen, fused vs clm_only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    for name, colour in (("fused", "tab:red"), ("clm_only", "tab:blue")):
        tokens, bpb = zip(*curves[name], strict=True)
        axis.plot(tokens, bpb, marker="o", markersize=3, color=colour, label=name)
    axis.axhline(efficiency["clm_only_final_bpb"], color="tab:blue", linestyle=":", linewidth=1)
    if efficiency["fused_tokens_to_match"]:
        axis.axvline(efficiency["fused_tokens_to_match"], color="tab:red", linestyle=":")
        axis.set_title(
            f"fused matches clm_only's final bpb with {efficiency['ratio']:.2f}× fewer tokens"
        )
    else:
        axis.set_title("fused does not reach clm_only's final bpb within the budget")
    axis.set_xlabel("target tokens seen")
    axis.set_ylabel("held-out average bits per byte")
    axis.set_ylim(top=min(max(b for c in curves.values() for _, b in c[1:]) + 0.05, 99))
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(file, dpi=110)
    plt.close(figure)
