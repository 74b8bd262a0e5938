"""TensorBoard event files (read back with TensorBoard's own reader), the matplotlib figures,
and --wandb without the package."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_evaluate import checkpoint, sample_args  # noqa: F401 (a fixture)
from test_train import read_metrics, tiny_args

import evaluate_fid
import train
from common.plots import ratio_bars, smoothed


def events(folder) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def test_training_scalars_images_and_config_match_metrics_jsonl_across_a_resume(tmp_path):
    """Steps 1-4 logged, the checkpoint of step 4 lost (as if killed after logging past the
    last checkpoint), resumed from step 2 to 6: every scalar appears once per step with the
    value metrics.jsonl holds, the previews are there, the config was written once."""
    preview = ["--sample-every", "2", "--preview-count", "4", "--num-sampling-steps", "3"]
    assert train.main(tiny_args(tmp_path, "--ckpt-every", "2", *preview, steps=4)) == 0
    os.remove(tmp_path / "checkpoints" / "0000004.pt")
    assert train.main(tiny_args(tmp_path, "--ckpt-every", "2", "--resume", *preview, steps=6)) == 0
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    logged = events(tmp_path)
    for key in ("loss", "lr", "grad_norm", "steps_per_s", "images_per_s", "peak_mem_gb"):
        scalars = logged.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == [1, 2, 3, 4, 5, 6], key
        expected = [r[key] for r in records]
        np.testing.assert_allclose([s.value for s in scalars], expected, rtol=1e-6)
    assert [image.step for image in logged.Images("preview")] == [2, 4, 6]
    assert len(logged.Tensors("config/text_summary")) == 1


def test_no_tensorboard_writes_no_event_file(tmp_path):
    assert train.main(tiny_args(tmp_path, "--no-tensorboard", steps=1)) == 0
    assert not any(name.startswith("events.out") for name in os.listdir(tmp_path))


def test_wandb_without_the_package_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert train.main(tiny_args(tmp_path / "run", "--wandb", "my-project")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install wandb" in err
    assert not (tmp_path / "run").exists()


def test_wandb_offline_run_logs_scalars_and_previews(tmp_path):
    """The real wandb package in offline mode (no network): the run ends normally and its
    offline run folder holds the logged preview images."""
    import subprocess
    import sys

    from test_train import REPO

    preview = ["--sample-every", "2", "--preview-count", "4", "--num-sampling-steps", "3"]
    cmd = [sys.executable, "train.py", *tiny_args(tmp_path, "--wandb", "vca-dit-test", *preview,
                                                  steps=2)]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert list((runs[0] / "files" / "media" / "images").glob("preview_2_*.png"))


def test_evaluate_fid_writes_metrics_at_the_checkpoints_step(checkpoint, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("VCA_DIT_CACHE", str(tmp_path / "cache"))
    state = torch.load(checkpoint, weights_only=True)
    trained = tmp_path / "0001234.pt"
    torch.save({"model": state, "ema": state, "step": 1234}, trained)
    board, out_json = tmp_path / "board", tmp_path / "m.json"
    argv = sample_args(trained, tmp_path / "samples", "--ref", "synthetic", "--json", str(out_json),
                       "--tensorboard-dir", str(board))  # fmt: skip
    assert evaluate_fid.main(argv) == 0
    result = json.loads(out_json.read_text())["metrics"]
    scalars = events(board).Scalars("eval/class_accuracy")
    assert [(s.step, s.value) for s in scalars] == [(1234, pytest.approx(result["class_accuracy"]))]


def test_smoothing_is_the_debiased_moving_average():
    values = np.array([4.0, 2.0, 3.0, 1.0])
    w = 0.6
    expected = [
        sum(w ** (i - j) * (1 - w) * values[j] for j in range(i + 1)) / (1 - w ** (i + 1))
        for i in range(len(values))
    ]
    np.testing.assert_allclose(smoothed(values, w), expected, rtol=1e-12)
    np.testing.assert_allclose(smoothed([2.5] * 5), 2.5)


def test_figures_are_pngs(tmp_path):
    train.main(tiny_args(tmp_path / "run", steps=3))
    assert Image.open(tmp_path / "run" / "loss.png").size == (700, 420)
    ratio_bars([("a", 2.0), ("b", 0.5)], tmp_path / "bars.png", "ratios")
    assert Image.open(tmp_path / "bars.png").format == "PNG"
