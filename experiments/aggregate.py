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
    "top1": ("top-1", True),
    "top5": ("top-5", True),
}


def welch_interval(baseline, other, confidence: float = 0.95) -> tuple[float, float, float]:
    """mean(other) - mean(baseline) and its Welch t interval (unequal variances)."""
    a, b = np.asarray(baseline, float), np.asarray(other, float)
    var_a, var_b = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff = b.mean() - a.mean()
    dof = (var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    half = stats.t.ppf((1 + confidence) / 2, dof) * math.sqrt(var_a + var_b)
    return diff, diff - half, diff + half


def run_folder(model: str, attention: str) -> str:
    """The folder of a cell's seeds, e.g. DiT-T-4-vca: tables sharing a cell share its runs."""
    return f"{model.replace('/', '-')}-{attention}"


PROPORTIONS = ("top1", "top5")  # accuracies whose noise is binomial when none was measured


def collect(folder, cells) -> dict:
    """(model, attention) -> metric -> [value per seed], from <cell>/seed*/eval.json of the
    given cells. A metric's evaluation noise is collected beside it as `<metric>_bootstrap_se`:
    as the evaluation measured it, or for a top-k accuracy over n images the binomial standard
    error sqrt(p (1 - p) / n), which a bootstrap over the images estimates."""
    found = {}
    for model, attention in cells:
        for path in sorted((Path(folder) / run_folder(model, attention)).glob("seed*/eval.json")):
            metrics = json.loads(path.read_text())["metrics"]
            values = found.setdefault((model, attention), {})
            for metric, value in metrics.items():
                if metric.removesuffix("_bootstrap_se") in METRICS and isinstance(value, float):
                    values.setdefault(metric, []).append(value)
            for metric in PROPORTIONS:
                if metric in metrics and f"{metric}_bootstrap_se" not in metrics:
                    p, n = metrics[metric], metrics["num_samples"]
                    values.setdefault(f"{metric}_bootstrap_se", []).append(
                        math.sqrt(p * (1 - p) / n)
                    )
    return found


def table(cells: dict, baseline: str) -> str:
    """A markdown table: per cell and metric mean ± std over seeds, for every attention but
    the baseline the difference to the same model's baseline with its 95% interval, and the
    evaluation's own noise (bootstrap SE over a run's samples, averaged over seeds) where the
    evaluation measured it."""
    metrics = [m for m in METRICS if any(m in values for values in cells.values())]
    measured = {key for values in cells.values() for key in values}
    header = ["model", "attention", "seeds"]
    for metric in metrics:
        header += [METRICS[metric][0], f"vs {baseline} [95% CI]"]
        if f"{metric}_bootstrap_se" in measured:
            header.append("eval noise (SE)")
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
            if f"{metric}_bootstrap_se" in measured:
                noise = values.get(f"{metric}_bootstrap_se")
                row.append(f"{np.mean(noise):.4f}" if noise else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_summary(folder, name: str, baseline: str, cells) -> str:
    """<name>.md and <name>.png in `folder` from the runs of `cells`; returns the table."""
    found = collect(folder, cells)
    text = table(found, baseline)
    (Path(folder) / f"{name}.md").write_text(text + "\n")
    metric = next((m for m in METRICS if any(m in v for v in found.values())), None)
    if metric is not None:
        labels = [f"{model}\n{attention}" for model, attention in sorted(found)]
        seeds = [found[key].get(metric, [np.nan]) for key in sorted(found)]
        cell_means(labels, seeds, Path(folder) / f"{name}.png", METRICS[metric][0])
    return text
