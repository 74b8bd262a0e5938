"""The benchmarks run end to end at toy size and report consistent numbers."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_attention_benchmark_runs_and_reports_ratios(tmp_path):
    out = tmp_path / "attention.json"
    cmd = [sys.executable, "-m", "bench.attention", "--widths", "T", "--tokens", "64", "256",
           "--attention", "mhsa", "vca", "diffattn", "--reps", "2", "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["tokens"], r["pass"]) for r in rows] == [
        (64, "fwd"), (64, "fwd+bwd"), (256, "fwd"), (256, "fwd+bwd")
    ]  # fmt: skip
    for row in rows:
        for kind in ("vca", "diffattn"):
            expected = row["ms"]["mhsa"] / row["ms"][kind]
            assert abs(row["speedup_vs_mhsa"][kind] - expected) < 1e-9 * expected
        assert all(mb >= 0 for mb in row["peak_mb"].values())
    assert "| T | 256 | fwd+bwd |" in result.stdout
