"""Seeds -> a table: mean ± std per cell, the difference to the table's baseline attention with
a 95% Welch confidence interval, and a figure."""

import json
import math
from pathlib import Path

import numpy as np
from scipy import stats

from common.plots import cell_means

# metric -> (label, higher is better)
METRICS = {
    "class_accuracy": ("class accuracy", True),
    "frechet_distance": ("Frechet distance (demo features)", False),
    "fid": ("FID-50K", False),
}


def welch_interval(baseline, other, confidence: float = 0.95) -> tuple[float, float, float]:
    """mean(other) - mean(baseline) and its Welch t interval (unequal variances)."""
    a, b = np.asarray(baseline, float), np.asarray(other, float)
    var_a, var_b = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff = b.mean() - a.mean()
    dof = (var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    half = stats.t.ppf((1 + confidence) / 2, dof) * math.sqrt(var_a + var_b)
    return diff, diff - half, diff + half


def collect(folder) -> dict:
    """(model, attention) -> metric -> [value per seed], from */seed*/eval.json."""
    cells = {}
    for path in sorted(Path(folder).glob("*/seed*/eval.json")):
        report = json.loads(path.read_text())
        values = cells.setdefault((report["model"], report["attention"]), {})
        for metric, value in report["metrics"].items():
            if (metric in METRICS or metric == "num_samples") and isinstance(value, (int, float)):
                values.setdefault(metric, []).append(float(value))
    return cells


def accuracy_noise(values: dict) -> float | None:
    """The evaluation's own sampling noise in class accuracy: the binomial standard error
    sqrt(p (1 - p) / n) of each seed's n samples (what a bootstrap over the samples
    estimates), averaged over seeds; None without accuracies."""
    accuracies, counts = values.get("class_accuracy"), values.get("num_samples")
    if not accuracies or not counts:
        return None
    return float(
        np.mean([math.sqrt(p * (1 - p) / n) for p, n in zip(accuracies, counts, strict=True)])
    )


def table(cells: dict, baseline: str) -> str:
    """A markdown table: per cell and metric mean ± std over seeds, and for every attention but
    the baseline the difference to the same model's baseline with its 95% interval."""
    metrics = [m for m in METRICS if any(m in values for values in cells.values())]
    header = ["model", "attention", "seeds"]
    for metric in metrics:
        header += [METRICS[metric][0], f"vs {baseline} [95% CI]"]
    noisy = "class_accuracy" in metrics
    if noisy:
        header.append("accuracy eval noise (SE)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (model, attention), values in sorted(cells.items()):
        row = [model, attention, str(max(len(v) for v in values.values()))]
        for metric in metrics:
            seeds = values.get(metric, [])
            base = cells.get((model, baseline), {}).get(metric, [])
            row.append(f"{np.mean(seeds):.4f} ± {np.std(seeds, ddof=1):.4f}" if len(seeds) > 1
                       else (f"{seeds[0]:.4f}" if seeds else "-"))  # fmt: skip
            if attention != baseline and len(seeds) > 1 and len(base) > 1:
                diff, low, high = welch_interval(base, seeds)
                row.append(f"{diff:+.4f} [{low:+.4f}, {high:+.4f}]")
            else:
                row.append("-")
        if noisy:
            noise = accuracy_noise(values)
            row.append("-" if noise is None else f"{noise:.4f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_summary(folder, baseline: str) -> str:
    """summary.md and summary.png in `folder`; returns the table."""
    cells = collect(folder)
    text = table(cells, baseline)
    (Path(folder) / "summary.md").write_text(text + "\n")
    metric = next((m for m in METRICS if any(m in v for v in cells.values())), None)
    if metric is not None:
        labels = [f"{model}\n{attention}" for model, attention in sorted(cells)]
        seeds = [cells[key].get(metric, [np.nan]) for key in sorted(cells)]
        cell_means(labels, seeds, Path(folder) / "summary.png", METRICS[metric][0])
    return text
