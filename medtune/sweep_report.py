"""A sweep's summary: mean and std over seeds per cell, as CSV, JSON, a Markdown report and a plot.

The plot puts accuracy against epsilon on a log axis for the DP runs (federated and local, with
error bars of one std over seeds); the non-private runs (pooled, federated and local without DP)
have no epsilon, so they are drawn as horizontal reference lines with their std as a band.
"""

from __future__ import annotations

import math
import os
import platform
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd

from medtune.files import atomic_write_bytes, atomic_write_json

METRICS = (
    "accuracy",
    "macro_f1",
    "worst_hospital_accuracy",
    "mean_hospital_accuracy",
    "accuracy_on_all_hospitals",
    "epsilon_spent",
    "rounds",
    "wall_seconds",
    "bytes_per_hospital_round",
    "bytes_total",
)
REFERENCE_STYLE = {"pooled": ("black", "--"), "federated": ("tab:blue", ":"), "local": ("tab:orange", ":")}
PLOT_FILE = "accuracy_vs_epsilon.png"


def summarise(rows: list[dict[str, Any]], axes: list[str]) -> pd.DataFrame:
    """One row per (axes, method, epsilon): mean and std of every metric over seeds."""
    frame = pd.DataFrame(rows)
    frame["epsilon"] = frame["epsilon"].map(float)
    frame["epsilon_spent"] = frame["epsilon_spent"].map(float)
    keys = [*axes, "method", "epsilon"]
    grouped = frame.groupby(keys, sort=True)
    summary = grouped[list(METRICS)].agg(["mean", "std"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    summary.insert(0, "seeds", grouped.size())
    return summary.reset_index()


def _label(method: str, epsilon: float) -> str:
    return f"{method} (no DP)" if math.isinf(epsilon) else f"{method} (DP)"


def _plot(summary: pd.DataFrame, axes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(summary.groupby(axes)) if axes else [((), summary)]
    figure, subplots = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False, sharey=True)
    for subplot, (key, panel) in zip(subplots[0], panels, strict=True):
        private = panel[panel["epsilon"].map(math.isfinite)]
        for method, colour in (("federated", "tab:blue"), ("local", "tab:orange")):
            points = private[private["method"] == method].sort_values("epsilon")
            if len(points):
                subplot.errorbar(
                    points["epsilon"], points["accuracy_mean"], yerr=points["accuracy_std"].fillna(0.0),
                    marker="o", capsize=4, color=colour, label=_label(method, 1.0),
                )
        for row in panel[panel["epsilon"].map(math.isinf)].itertuples():
            colour, style = REFERENCE_STYLE[row.method]
            std = 0.0 if math.isnan(row.accuracy_std) else row.accuracy_std
            subplot.axhline(row.accuracy_mean, color=colour, linestyle=style, label=_label(row.method, math.inf))
            subplot.axhspan(row.accuracy_mean - std, row.accuracy_mean + std, color=colour, alpha=0.08)
        subplot.set_xscale("log")
        subplot.set_xlabel("epsilon per hospital (log scale)")
        key = key if isinstance(key, tuple) else (key,)
        subplot.set_title(", ".join(f"{a}={v}" for a, v in zip(axes, key, strict=True)) or "accuracy vs privacy")
        subplot.grid(True, which="both", alpha=0.3)
    subplots[0][0].set_ylabel("global test accuracy (mean ± std over seeds)")
    subplots[0][-1].legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _markdown_table(summary: pd.DataFrame, axes: list[str]) -> str:
    """Mean ± std per cell, in the units a reader wants (accuracy, epsilon, KiB, seconds)."""

    def pm(row: Any, metric: str, digits: int = 3) -> str:
        mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
        if isinstance(mean, float) and math.isinf(mean):
            return "∞"
        return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")

    header = [*axes, "method", "ε target", "seeds", "accuracy", "macro-F1", "worst hospital",
              "accuracy on every hospital's test", "ε spent (max)",
              "KiB / hospital / round", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in summary.iterrows():
        cells = [str(row[a]) for a in axes] + [
            row["method"],
            "∞ (no DP)" if math.isinf(row["epsilon"]) else f"{row['epsilon']:g}",
            str(row["seeds"]),
            pm(row, "accuracy"),
            pm(row, "macro_f1"),
            pm(row, "worst_hospital_accuracy"),
            pm(row, "accuracy_on_all_hospitals"),
            pm(row, "epsilon_spent", 2),
            f"{row['bytes_per_hospital_round_mean'] / 1024:.1f}" if row["method"] == "federated" else "0",
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
    axes = sorted(sweep.axes)
    summary = summarise(rows, axes)
    atomic_write_bytes(out / "results.csv", summary.to_csv(index=False).encode())
    atomic_write_json(
        out / "results.json",
        {
            "sweep": {
                "name": sweep.name,
                "scenario": sweep.scenario,
                "epsilons": ["inf" if math.isinf(e) else e for e in sweep.privacy_axis],
                "seeds": list(sweep.seeds),
                "run_config": sweep.run_config,
                "axes": {k: list(v) for k, v in sweep.axes.items()},
            },
            "summary": summary.replace({math.inf: "inf"}).astype(object).where(summary.notna(), None).to_dict("records"),
            "runs": rows,
        },
    )
    _plot(summary, axes, out / PLOT_FILE)
    report = "\n\n".join(
        [
            f"# Benchmark sweep `{sweep.name}`",
            f"Scenario `{sweep.scenario}`, overrides `{sweep.run_config}`, axes `{dict(sweep.axes)}`, "
            f"seeds {list(sweep.seeds)}. Machine: {_machine()}. Date: {date.today().isoformat()}.",
            "Accuracy and macro-F1 are over every hospital's test split together; federated runs are scored "
            "with the final global prompt and head, local runs with each hospital's own model on its own test "
            "split (which favours local models under label skew: each learns its own label mix). "
            "\"Accuracy on every hospital's test\" scores each local model on all hospitals' test splits: how "
            "well one hospital's model serves the whole federation's patients. ε spent is the largest over "
            "hospitals. Mean ± std over seeds.",
            _markdown_table(summary, axes),
            f"![accuracy against epsilon]({PLOT_FILE})",
        ]
    )
    atomic_write_bytes(out / "report.md", (report + "\n").encode())
    return summary
