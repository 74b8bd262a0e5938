"""The training-step and sampling benchmarks run end to end at toy size, their numbers are
consistent (ratios, images/s, FLOPs, MFU), the fast samples are compared with the fp32 ones, and
the report turns the JSON into a table and a chart. The compile path is traced with the eager
backend: inductor's code generation takes minutes on a small CPU."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from bench.sampling import closeness, random_model
from bench.train_step import step_flops
from models import create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["--image-size", "64", "--batch", "2", "--random-vae", "tiny"]


def run(module, *flags):
    cmd = [sys.executable, "-m", f"bench.{module}", *flags]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    train_flags = ["--model", "DiT-T/4", "--attention", "mhsa", "vca", "--steps", "1"]
    train_flags += ["--compile-backend", "eager", "--peak-tflops", "2.5", "--fast-precision"]
    train_flags += ["bf16", "--out", str(out / "train_step.json"), *TOY]
    sample_flags = ["--dit-model", "DiT-T/4", "--sit-model", "SiT-T/4", "--steps", "3"]
    sample_flags += ["--no-compile", "--fast-precision", "bf16"]
    sample_flags += ["--out", str(out / "sampling.json"), *TOY]
    stdout = run("train_step", *train_flags) + run("sampling", *sample_flags)
    run("report", "--dir", str(out))
    return out, stdout


def load(out, name):
    return json.loads((out / f"{name}.json").read_text())


def test_train_step_rows_and_ratios(results):
    out, stdout = results
    payload = load(out, "train_step")
    rows = {(r["attention"], r["mode"]): r for r in payload["rows"]}
    assert list(rows) == [("mhsa", "reference"), ("mhsa", "fast"), ("vca", "reference"),
                          ("vca", "fast")]  # fmt: skip
    ref, fast = payload["settings"]["reference"], payload["settings"]["fast"]
    assert (ref["precision"], ref["latents"], ref["fused_adamw"], ref["compile"]) == (
        "fp32", "vae", False, False
    )  # fmt: skip
    assert (fast["precision"], fast["latents"], fast["fused_adamw"], fast["compile"]) == (
        "bf16", "cached", True, "eager"
    )  # fmt: skip
    model = create_model("DiT-T/4", input_size=8)
    param_bytes = 4 * sum(p.numel() for p in model.parameters())
    for (kind, mode), row in rows.items():
        reference = rows[kind, "reference"]["step_s"]
        assert row["speedup_vs_reference"] == pytest.approx(reference / row["step_s"], rel=1e-12)
        assert row["speed_vs_first_attention"] == pytest.approx(
            rows["mhsa", mode]["step_s"] / row["step_s"], rel=1e-12
        )
        assert row["images_per_s"] == pytest.approx(2 / row["step_s"], rel=1e-12)
        assert row["mfu"] == pytest.approx(row["flops_per_step"] / row["step_s"] / 2.5e12)
        # weights, gradients, EMA and AdamW's two moments (not of the fixed pos_embed)
        assert row["peak_mb"] * 2**20 > 4.99 * param_bytes
        assert row["flops_per_step"] == rows[kind, "reference"]["flops_per_step"] > 0
    assert "| DiT-T/4 64px | vca | fast | bf16 | cached | eager | fused | 2 |" in stdout


def test_step_flops_match_dit_paper():
    """DiT-S/2 at 256 px is 6.06 GMACs forward; forward+backward is about 3x2x that."""
    model = create_model("DiT-S/2", input_size=32)
    args = type("Args", (), {"model": "DiT-S/2", "batch": 3})()
    flops = step_flops(model, args, 4, 32, torch.device("cpu"))
    assert flops / 3 == pytest.approx(6 * 6.06e9, rel=0.05)


def test_sampling_rows_ratios_and_closeness(results):
    out, stdout = results
    payload = load(out, "sampling")
    assert payload["vae_decode_included"] is True
    rows = payload["rows"]
    assert [(r["sampler"], r["model"], r["mode"]) for r in rows] == [
        ("ddpm", "DiT-T/4", "reference"), ("ddpm", "DiT-T/4", "fast"),
        ("sde", "SiT-T/4", "reference"), ("sde", "SiT-T/4", "fast"),
        ("ode", "SiT-T/4", "reference"), ("ode", "SiT-T/4", "fast"),
    ]  # fmt: skip
    for reference, fast in zip(rows[::2], rows[1::2], strict=True):
        assert fast["speedup_vs_reference"] == pytest.approx(
            reference["seconds"] / fast["seconds"], rel=1e-12
        )
        for row in (reference, fast):
            assert row["images_per_s"] == pytest.approx(2 / row["seconds"], rel=1e-12)
            assert row["steps"] == 3 and row["spec"]["steps"] == 3
        assert "psnr_db" not in reference
        # bf16 changes the images a little, not a lot
        assert 0 < fast["max_abs_diff"] < 0.5
        assert math.isfinite(fast["psnr_db"]) and fast["psnr_db"] > 30
    assert rows[4]["spec"]["sampling_method"] == "euler"
    assert "| ode euler, 3 steps, cfg 4.0 | SiT-T/4 64px | mhsa | fast | bf16 | no |" in stdout


def test_closeness_and_random_model():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    y = (x + 0.01).clamp(-1, 1)
    mse = (x - y).double().square().mean().item()
    close = closeness(y, x)
    assert close["psnr_db"] == pytest.approx(10 * math.log10(4 / mse))
    assert close["max_abs_diff"] == pytest.approx(0.01, abs=1e-6)
    assert closeness(x, x)["psnr_db"] == math.inf
    # a fresh DiT predicts zeros; the benchmark's model must not, or bf16 could not differ
    model = random_model("DiT-T/4", "mhsa", 8, 4, seed=0)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2]))
    assert out.abs().mean() > 1e-3


def test_report_writes_tables_and_chart(results):
    out, _ = results
    page = (out / "README.md").read_text()
    assert "## Training step" in page and "## Sampling" in page
    assert "| DiT-T/4 64px | mhsa | fast |" in page
    assert "python -m bench.sampling --dit-model DiT-T/4" in page
    with Image.open(out / "speedups.png") as chart:
        assert chart.format == "PNG" and chart.width > 400
        bars = (
            len(load(out, "train_step")["rows"]) // 2 + 1 + len(load(out, "sampling")["rows"]) // 2
        )
        assert chart.height == round(100 * (1.2 + 0.32 * bars))  # one row per ratio


def test_report_takes_every_json_of_a_benchmark(results, tmp_path):
    """`make bench-gpu` writes one train_step-*.json per model: each becomes its own section."""
    out, _ = results
    payload = load(out, "train_step")
    (tmp_path / "train_step.json").write_text(json.dumps(payload))
    payload["argv"] = ["--model", "DiT-B/2"]
    (tmp_path / "train_step-b2.json").write_text(json.dumps(payload))
    run("report", "--dir", str(tmp_path))
    page = (tmp_path / "README.md").read_text()
    assert page.count("## Training step") == 2
    assert "`python -m bench.train_step --model DiT-B/2`" in page
