"""Collects the benchmark JSON files into one markdown page and a bar chart of the speed ratios.

    python -m bench.report                  # bench/results/*.json -> README.md, speedups.png

Every <benchmark>*.json in the folder is a section (e.g. train_step.json, train_step-b2-512.json).

Every ratio is measured inside one run (the configurations alternate), so it holds on a noisy
machine where the absolute times do not.
"""

import glob
import json
import os

from common.cli import ArgumentParser
from common.plots import ratio_bars

from . import compile_time, recompute, sampling, train_step

BENCHMARKS = ("attention", "train_step", "compile_time", "recompute", "sampling")
TITLES = {
    "recompute": "Compiled VCA layer: what the traced backward saves or recomputes, per policy",
    "train_step": "Training step: original DiT recipe (reference) against ours (fast)",
    "compile_time": "Cold compile time of the training step's blocks",
    "sampling": "Sampling, VAE decode included: sample.py recipe (reference) against ours (fast)",
}


def attention_table(payload: dict) -> tuple[list, list]:
    rows = payload["rows"]
    first = rows[0]
    kinds = list(first.get("ms") or first.get("peak_mb") or first["saved_mb"])
    base = kinds[0]
    header = ["part", "width", "N", "pass", "mode", "dtype", "batch"]
    if "ms" in first:
        header += [f"{k} ms" for k in kinds] + [f"{k} vs {base}" for k in kinds[1:]]
    if "peak_mb" in first:
        header += [f"{k} MB" for k in kinds] + [f"{k}/{base} MB" for k in kinds[1:]]
    saves = any("saved_mb" in row for row in rows)
    if saves:
        header += [f"{k} saved MB" for k in kinds] + [f"{k}/{base} saved" for k in kinds[1:]]
    cells = []
    for row in rows:
        cell = [row.get("part", "layer"), row["width"], str(row["tokens"]), row["pass"]]
        mode = "compiled" if row.get("compiled") else "eager"
        cell += [mode, row["dtype"], str(row.get("batch", 1))]
        if "ms" in row:
            speed = row["speedup_vs_" + base]
            cell += [f"{row['ms'][k]:.2f}" for k in kinds] + [f"{speed[k]:.2f}x" for k in kinds[1:]]
        if "peak_mb" in row:
            peak = row["peak_mb"]
            cell += [f"{peak[k]:.1f}" for k in kinds]
            cell += [f"{peak[k] / peak[base]:.2f}x" for k in kinds[1:]]
        if saves:
            saved = row.get("saved_mb")
            if saved:
                cell += [f"{saved[k]:.1f}" for k in kinds]
                cell += [f"{saved[k] / saved[base]:.2f}x" for k in kinds[1:]]
            else:
                cell += ["-"] * (2 * len(kinds) - 1)
        cells.append(cell)
    return header, cells


def title(name: str, payload: dict) -> str:
    """The section's heading; an attention run says what it covers and measures."""
    if name != "attention":
        return TITLES[name]
    rows = payload["rows"]
    part = "Token mixing alone" if rows[0].get("part") == "mixing" else "Attention layer"
    measures = (("ms", "time"), ("peak_mb", "peak memory"), ("saved_mb", "memory saved"))
    measured = ", ".join(m for key, m in measures if any(key in row for row in rows))
    mode = "compiled" if rows[0].get("compiled") else "eager"
    return f"{part}, {mode}, {measured}: MHSA against VCA"


TABLES = {
    "attention": attention_table,
    "train_step": train_step.table,
    "compile_time": compile_time.table,
    "recompute": recompute.table,
    "sampling": sampling.table,
}


def ratios(name: str, payload: dict) -> list[tuple[str, float]]:
    """(label, ratio) bars: fast against reference, and each mixer against the first."""
    bars, first = [], payload["rows"][0].get("attention")
    if name == "compile_time":
        return bars
    if name == "recompute":
        return [
            (
                f"compiled layer {r['width']} N={r['tokens']} {r['policy']} vs mhsa",
                r["speed_vs_mhsa"],
            )
            for r in payload["rows"]
            if r["policy"] != "mhsa"
        ]
    for row in payload["rows"]:
        if name == "attention":
            if "ms" not in row:  # a memory-only run
                continue
            for kind, value in row["speedup_vs_" + next(iter(row["ms"]))].items():
                where = f"{row.get('part', 'layer')} {row['width']} N={row['tokens']} {row['pass']}"
                bars.append((f"{where} {kind}", value))
            continue
        if row["mode"] != "fast":
            continue
        what = "train" if name == "train_step" else f"sample {row['sampler']}"
        label = f"{what} {row['model']} {row['attention']}"
        bars.append((f"{label}: fast vs reference", row["speedup_vs_reference"]))
        if row.get("speed_vs_first_attention", 1.0) != 1.0:
            bars.append((f"{label} vs {first} (fast)", row["speed_vs_first_attention"]))
    return bars


def main(argv=None):
    parser = ArgumentParser(
        prog="python -m bench.report",
        description="Markdown tables and a PNG bar chart from the benchmarks' JSON files.",
    )
    parser.add_argument(
        "--dir", default="bench/results", help="folder of <benchmark>.json (default bench/results)"
    )
    args = parser.parse_args(argv)

    lines, bars = ["# Benchmark results", ""], []
    lines += [
        "Ratios are measured side by side in one run; absolute times depend on the machine's load."
        " Regenerate with `make bench`.",
        "",
        "![speed ratios](speedups.png)",
        "",
    ]
    files = [
        (benchmark, path)
        for benchmark in BENCHMARKS
        for path in sorted(glob.glob(os.path.join(args.dir, f"{benchmark}*.json")))
    ]
    for name, path in files:
        with open(path) as f:
            payload = json.load(f)
        header, cells = TABLES[name](payload)
        lines += [f"## {title(name, payload)}", "", f"Device: {payload.get('device', '?')}, torch "]
        lines[-1] += f"{payload['torch']}; command: `python -m bench.{name} "
        lines[-1] += " ".join(payload["argv"]) + "`"
        lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        lines.append("")
        bars += ratios(name, payload)
    if not files:
        parser.exit(2, f"error: no benchmark JSON in {args.dir}; run the benchmarks first\n")
    chart = os.path.join(args.dir, "speedups.png")
    ratio_bars(bars, chart, "speed ratio (log scale): fast vs reference, VCA vs MHSA")
    with open(os.path.join(args.dir, "README.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {os.path.join(args.dir, 'README.md')} and {chart}")


if __name__ == "__main__":
    main()
