"""The project's figures, drawn with matplotlib's object API (no pyplot state, no display
needed) and written atomically: the training loss curve and the benchmark ratio chart."""

import numpy as np
from matplotlib.figure import Figure

from .files import atomic_write


def smoothed(values, weight: float = 0.9) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average, debiased so the first points
    are not pulled towards zero."""
    out, average, total = [], 0.0, 0.0
    for value in values:
        average = weight * average + (1 - weight) * value
        total = weight * total + (1 - weight)
        out.append(average / total)
    return np.asarray(out)


def _save(figure: Figure, path) -> None:
    with atomic_write(path) as f:
        figure.savefig(f, format="png", dpi=100)


def loss_curve(steps, losses, path, title: str = "training loss") -> None:
    """Raw and smoothed loss against the step, log-scale loss axis."""
    figure = Figure(figsize=(7, 4.2), layout="constrained")
    ax = figure.subplots()
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    if len(losses) > 1:
        ax.plot(steps, smoothed(losses), color="tab:blue", linewidth=2, label="smoothed (0.9)")
    if min(losses, default=0) > 0:
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save(figure, path)


def ratio_bars(bars: list[tuple[str, float]], path, title: str) -> None:
    """Horizontal bars of speed ratios on a log2 axis, a line at 1x (no change)."""
    figure = Figure(figsize=(9, 1.2 + 0.32 * len(bars)), layout="constrained")
    ax = figure.subplots()
    labels = [label for label, _ in bars]
    values = [value for _, value in bars]
    colours = ["tab:green" if value >= 1 else "tab:red" for value in values]
    positions = np.arange(len(bars))[::-1]
    ax.barh(positions, np.asarray(values) - 1, left=1, color=colours)  # from 1x to the value
    ax.set_xscale("log", base=2)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(positions, labels, fontsize=8)
    for y, value in zip(positions, values, strict=True):
        end = (max(value, 1.0), y)  # right of the bar, or of the 1x line for a slowdown
        ax.annotate(f"{value:.2f}x", end, xytext=(4, 0), textcoords="offset points", va="center")
    ax.set(xlabel="speed ratio (log scale)", title=title)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    _save(figure, path)


def cell_means(labels: list[str], seeds: list[list[float]], path, ylabel: str) -> None:
    """One point per seed and the mean ± std per cell (a study's figure)."""
    figure = Figure(figsize=(1.2 + 1.1 * len(labels), 4), layout="constrained")
    ax = figure.subplots()
    for x, values in enumerate(seeds):
        values = np.asarray(values, float)
        ax.scatter(np.full(len(values), x), values, color="tab:gray", s=12, zorder=2)
        spread = values.std(ddof=1) if len(values) > 1 else 0.0
        ax.errorbar(x, values.mean(), yerr=spread, fmt="o", color="tab:blue", capsize=4)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set(ylabel=ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    _save(figure, path)
