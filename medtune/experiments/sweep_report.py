"""A sweep's summary: mean and std over seeds per cell, as CSV, JSON, a Markdown report and a plot.

The plot puts accuracy (top) and macro-F1 (bottom) against epsilon on a log axis for the DP runs
(federated as it is and with each hospital's own label mix applied, and local on its own hospital's
test split and, for accuracy, on every hospital's; error bars of one std over seeds); the
non-private runs (pooled, federated and local without DP, and the majority label) have no epsilon,
so they are drawn as horizontal reference lines with their std as a band.
"""

from __future__ import annotations

import math
import os
import platform
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd

from medtune.epsilon import read_epsilon
from medtune.files import atomic_write_bytes, atomic_write_json

METRICS = (
    "accuracy",
    "macro_f1",
    "worst_hospital_accuracy",
    "mean_hospital_accuracy",
    "accuracy_on_all_hospitals",
    "own_mix_accuracy",
    "own_mix_macro_f1",
    "own_mix_mean_hospital_accuracy",
    "epsilon_spent",
    "epsilon_audited",
    "rounds",
    "wall_seconds",
    "bytes_per_hospital_round",
    "bytes_total",
)
REFERENCE_STYLE = {
    "pooled": ("black", "--"),
    "federated": ("tab:blue", ":"),
    "local": ("tab:orange", ":"),
    "majority": ("grey", "-."),
    "zero-shot": ("tab:purple", "-."),
}
# references without a trained model: no privacy target to show
NO_EPSILON = ("majority", "zero-shot")
PLOT_FILE = "accuracy_vs_epsilon.png"
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1"}
# One plot row per metric; in each, the DP series as (method, metric column, colour, marker, legend
# suffix). Accuracy alone flatters a model that predicts a hospital's majority class, so macro-F1
# gets its own row. A local model's accuracy is drawn twice: on its own hospital's test split, and
# on every hospital's test split (what a shared model is for). The federated model is drawn twice as
# well: as it is, and with each hospital's own label mix applied on its own test split (how a site
# uses it).
OWN_MIX = ("tab:green", "^", " + own label mix, own test")
PLOT_ROWS = {
    "accuracy": (
        ("federated", "accuracy", "tab:blue", "o", ""),
        ("federated", "own_mix_accuracy", *OWN_MIX),
        ("local", "accuracy", "tab:orange", "o", ", own test"),
        ("local", "accuracy_on_all_hospitals", "tab:orange", "s", ", every hospital's test"),
    ),
    "macro_f1": (
        ("federated", "macro_f1", "tab:blue", "o", ""),
        ("federated", "own_mix_macro_f1", *OWN_MIX),
        ("local", "macro_f1", "tab:orange", "o", ", own test"),
    ),
}


def summarise(rows: list[dict[str, Any]], axes: list[str]) -> pd.DataFrame:
    """One row per (axes, method, epsilon): mean and std of every metric over seeds."""
    frame = pd.DataFrame(rows)
    # cells written before a metric existed (or by a method without it) show NaN
    for metric in METRICS:
        if metric not in frame:
            frame[metric] = math.nan
    frame["epsilon"] = frame["epsilon"].map(lambda value: read_epsilon(value, "sweep cell"))
    frame["epsilon_spent"] = frame["epsilon_spent"].map(
        lambda value: read_epsilon(value, "sweep cell", spent=True)
    )
    keys = [*axes, "method", "epsilon"]
    grouped = frame.groupby(keys, sort=True)
    summary = grouped[list(METRICS)].agg(["mean", "std"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    summary.insert(0, "seeds", grouped.size())
    return summary.reset_index()


def _label(method: str, epsilon: float) -> str:
    if method == "majority":
        return "each hospital's majority label (no model)"
    if method == "zero-shot":
        return "zero-shot: label names, no training"
    return f"{method} (no DP)" if math.isinf(epsilon) else f"{method} (DP)"


def _plot(summary: pd.DataFrame, axes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(summary.groupby(axes)) if axes else [((), summary)]
    figure, grid = plt.subplots(
        len(PLOT_ROWS),
        len(panels),
        figsize=(5.5 * len(panels) + 4.0, 4.2 * len(PLOT_ROWS)),
        squeeze=False,
        sharey="row",
    )
    for subplots, (row_metric, series) in zip(grid, PLOT_ROWS.items(), strict=True):
        for subplot, (key, panel) in zip(subplots, panels, strict=True):
            private = panel[panel["epsilon"].map(math.isfinite)]
            for method, metric, colour, marker, suffix in series:
                points = private[private["method"] == method].sort_values("epsilon")
                if len(points):
                    subplot.errorbar(
                        points["epsilon"],
                        points[f"{metric}_mean"],
                        yerr=points[f"{metric}_std"].fillna(0.0),
                        marker=marker,
                        capsize=4,
                        color=colour,
                        label=_label(method, 1.0) + suffix,
                        linestyle="-" if metric == row_metric else "--",
                    )
            for row in panel[panel["epsilon"].map(math.isinf)].itertuples():
                lines = [(row_metric, *REFERENCE_STYLE[row.method], "")]
                if row.method == "federated":
                    lines.append((f"own_mix_{row_metric}", OWN_MIX[0], ":", OWN_MIX[2]))
                for metric, colour, style, suffix in lines:
                    mean, std = getattr(row, f"{metric}_mean"), getattr(row, f"{metric}_std")
                    std = 0.0 if math.isnan(std) else std
                    subplot.axhline(
                        mean,
                        color=colour,
                        linestyle=style,
                        label=_label(row.method, math.inf) + suffix,
                    )
                    subplot.axhspan(mean - std, mean + std, color=colour, alpha=0.08)
            subplot.set_xscale("log")
            epsilons = sorted(private["epsilon"].unique())
            subplot.set_xticks(epsilons, [f"{e:g}" for e in epsilons])  # the swept values, not 10^k
            subplot.minorticks_off()
            subplot.set_xlabel("epsilon per hospital (log scale)")
            key = key if isinstance(key, tuple) else (key,)
            title = ", ".join(f"{a}={v}" for a, v in zip(axes, key, strict=True))
            subplot.set_title(title or f"{METRIC_NAMES[row_metric]} vs privacy")
            subplot.grid(True, which="both", alpha=0.3)
        subplots[0].set_ylabel(f"test {METRIC_NAMES[row_metric]} (mean ± std over seeds)")
        # beside, not over, the data
        subplots[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def _markdown_table(summary: pd.DataFrame, axes: list[str]) -> str:
    """Mean ± std per cell, in the units a reader wants (accuracy, epsilon, KiB, seconds)."""

    def pm(row: Any, metric: str, digits: int = 3) -> str:
        mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
        if isinstance(mean, float) and math.isinf(mean):
            return "∞"
        if isinstance(mean, float) and math.isnan(mean):
            return "—"  # a cell written before the metric existed
        return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")

    header = [
        *axes,
        "method",
        "ε target",
        "seeds",
        "accuracy",
        "macro-F1",
        "worst hospital",
        "accuracy on every hospital's test",
        "federated + own label mix: accuracy (own test; the mix is not covered by ε)",
        "ε spent (max)",
        "ε audited (lower bound)",
        "KiB / hospital / round",
        "wall s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in summary.iterrows():
        cells = [str(row[a]) for a in axes] + [
            row["method"],
            "—"
            if row["method"] in NO_EPSILON
            else "∞ (no DP)"
            if math.isinf(row["epsilon"])
            else f"{row['epsilon']:g}",
            str(row["seeds"]),
            pm(row, "accuracy"),
            pm(row, "macro_f1"),
            pm(row, "worst_hospital_accuracy"),
            pm(row, "accuracy_on_all_hospitals"),
            pm(row, "own_mix_accuracy") if row["method"] == "federated" else "—",
            "—" if row["method"] in NO_EPSILON else pm(row, "epsilon_spent", 2),
            pm(row, "epsilon_audited", 2) if row["method"] == "federated" else "—",
            f"{row['bytes_per_hospital_round_mean'] / 1024:.1f}"
            if row["method"] == "federated"
            else "0",
            f"{row['wall_seconds_mean']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _machine() -> str:
    import torch

    return (
        f"{platform.platform()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}"
    )


def write_report(sweep: Any, rows: list[dict[str, Any]], out: Path) -> pd.DataFrame:
    """results.csv, results.json, report.md and the plot, from every finished run."""
    axes = sweep.axis_names
    summary = summarise(rows, axes)
    atomic_write_bytes(out / "results.csv", summary.to_csv(index=False).encode())
    atomic_write_json(
        out / "results.json",
        {
            "sweep": {
                "name": sweep.name,
                "scenario": sweep.scenario,
                "epsilons": list(sweep.privacy_axis),
                "seeds": list(sweep.seeds),
                "run_config": sweep.run_config,
                "axes": {k: list(v) for k, v in sweep.axes.items()},
                "recipes": sweep.recipes,
            },
            "summary": summary.astype(object).where(summary.notna(), None).to_dict("records"),
            "runs": rows,
        },
    )
    _plot(summary, axes, out / PLOT_FILE)
    report = "\n\n".join(
        [
            f"# Benchmark sweep `{sweep.name}`",
            f"Scenario `{sweep.scenario}`, overrides `{sweep.run_config}`, axes "
            f"`{dict(sweep.axes)}`, recipes `{sweep.recipes}`, without DP also `{sweep.no_dp}`, "
            f"seeds {list(sweep.seeds)}. Machine: {_machine()}. Date: {date.today().isoformat()}.",
            "Accuracy and macro-F1 are over every hospital's test split together; federated runs "
            "are scored with the final global prompt and head, local runs with each hospital's own "
            "model on its own test split (which favours local models under label skew: each learns "
            'its own label mix). "Accuracy on every hospital\'s test" scores each local model on '
            "all hospitals' test splits: how well one hospital's model serves the whole "
            'federation\'s patients. "majority" has no model: each hospital predicts its most '
            "frequent training label, the score its label mix alone earns. "
            '"zero-shot" has no training: each record goes to the label whose name or description '
            "the untouched encoder embeds closest (the label-name prior the head starts from). "
            '"Federated + own label mix" is the final global model re-weighted to each hospital\'s '
            "own training label mix (a bias per label, matched so that its predictions over the "
            "hospital's training records follow their mix), on its own test split: how a hospital "
            "uses the shared model at home (the mix comes from the records without noise, so that "
            "model is not covered by ε). ε spent is the largest over hospitals. Mean ± std over "
            "seeds.",
            _markdown_table(summary, axes),
            f"![accuracy against epsilon]({PLOT_FILE})",
        ]
    )
    atomic_write_bytes(out / "report.md", (report + "\n").encode())
    return summary
