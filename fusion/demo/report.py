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


def intervals(
    models: Mapping[str, dict], domains: Sequence[str], names: Mapping[str, Sequence[str]]
) -> dict:
    """Paired verdicts over the data orders: fused vs clm_only, fused vs the best single
    teacher, that teacher vs clm_only; on the average and per domain, each with its 95 %
    interval (:func:`fusion.evaluate.verdict.compare`). ``names[arm]`` lists the arm's model
    names by data order (each scored per document)."""
    from fusion.evaluate.verdict import DocumentScores, compare

    def scores(arm: str) -> dict[int, DocumentScores]:
        return {
            order: DocumentScores({d: models[name]["documents"][d]["nll"] for d in domains})
            for order, name in enumerate(names[arm])
        }

    first = names["fused"][0]
    sizes = {d: models[first]["documents"][d]["bytes"] for d in domains}
    single = next(arm for arm in names if arm.startswith("distill_"))
    pairs = {
        "fused vs clm_only": ("fused", "clm_only"),
        f"fused vs {single}": ("fused", single),
        f"{single} vs clm_only": (single, "clm_only"),
    }
    return {
        label: {
            domain: compare(
                scores(a), scores(b), sizes, domains=None if domain == "avg" else [domain]
            ).as_dict()
            for domain in ("avg", *domains)
        }
        for label, (a, b) in pairs.items()
    }


def _interval(found: Mapping[str, object]) -> str:
    return (
        f"{found['mean_percent']:+.2f} % [{found['low']:+.2f}, {found['high']:+.2f}] "
        f"({found['verdict']})"
    )


def verdict(models: Mapping[str, dict], domains: Sequence[str]) -> dict:
    """Fused against every other model (not its own other data orders): Δ average bpb
    (negative: fused is better)."""
    fused = models["fused"]["avg_bpb"]
    deltas = {
        name: round(fused - entry["avg_bpb"], 5)
        for name, entry in models.items()
        if name != "fused" and not name.startswith("fused_order")
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
    orders = results.get("orders", 1)
    lines = [
        f"- **{label} over {orders} data orders: {_interval(found['avg'])}** on average; "
        + ", ".join(f"{d} {_interval(found[d])}" for d in results["domains"])
        for label, found in results.get("intervals", {}).items()
    ]
    lines += [
        f"- the first data order alone (one draw, no interval: the verdicts are above): fused "
        f"vs clm_only {delta:+.4f} bpb on average ({relative:+.2%}); per domain "
        + ", ".join(f"{d} {x:+.4f}" for d, x in v["delta_bpb_vs_clm_only_per_domain"].items()),
    ]
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
        f"`fused`, `clm_only` and the best single teacher ran on {results.get('orders', 1)} data "
        "orders (`*_order2`, …); every other arm on one. Intervals are 95 %: t over the orders "
        "and a paired bootstrap over the held-out documents; a verdict 'beats' means the whole "
        "interval lies below 0. Run `fusion demo` without `--quick` for the larger budget and "
        "the FuseLLM variants.",
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
