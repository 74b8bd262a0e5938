"""evaluate_fid.py end to end: sample sets that do not depend on processes, batches or restarts;
reference statistics; the metrics it reports; bad input. Tiny pixel-space models, 16 px."""

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate_fid
from metrics import InceptionFeatures, evaluate, load_reference
from models import create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A bare (official-format) DiT-T/4 state dict for 16 px pixel images, random weights."""
    torch.manual_seed(0)
    model = create_model("DiT-T/4", input_size=16, num_classes=5, in_channels=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "DiT-T-4-tiny.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def sample_args(checkpoint, folder, *extra, n=10):
    return ["--ckpt", str(checkpoint), "--device", "cpu", "--num-samples", str(n),
            "--shard-size", "4", "--batch-size", "3", "--sampler", "ddpm",
            "--num-sampling-steps", "4", "--cfg-scale", "2.0", "--sample-dir", str(folder),
            *extra]  # fmt: skip


def load_samples(folder):
    with np.load(os.path.join(folder, "samples.npz")) as f:
        return f["arr_0"], f["arr_1"]


def test_sample_set_is_independent_of_processes_batches_and_restarts(checkpoint, tmp_path):
    one = tmp_path / "one"
    assert evaluate_fid.main(sample_args(checkpoint, one)) == 0
    images, labels = load_samples(one)
    assert images.shape == (10, 16, 16, 3) and images.dtype == np.uint8
    assert labels.shape == (10,) and labels.max() < 5 and len(set(labels.tolist())) > 1
    assert len({images[i].tobytes() for i in range(10)}) == 10

    other_batch = tmp_path / "batch"
    assert evaluate_fid.main(sample_args(checkpoint, other_batch, "--batch-size", "4")) == 0
    np.testing.assert_array_equal(load_samples(other_batch)[0], images)

    # interrupted: one shard missing, one torn; the rerun draws only those
    resumed = tmp_path / "resumed"
    assert evaluate_fid.main(sample_args(checkpoint, resumed)) == 0
    os.remove(resumed / "shard-00001.npz")
    (resumed / "shard-00002.npz").write_bytes(b"torn")
    kept = (resumed / "shard-00000.npz").stat().st_mtime_ns
    assert evaluate_fid.main(sample_args(checkpoint, resumed)) == 0
    assert (resumed / "shard-00000.npz").stat().st_mtime_ns == kept
    got_images, got_labels = load_samples(resumed)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)

    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "evaluate_fid.py", *sample_args(checkpoint, two, "--batch-size", "2")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    two_images, two_labels = load_samples(two)
    np.testing.assert_array_equal(two_images, images)
    np.testing.assert_array_equal(two_labels, labels)


def test_balanced_labels_and_other_settings_are_refused_in_the_same_folder(checkpoint, tmp_path):
    folder = tmp_path / "balanced"
    assert evaluate_fid.main(sample_args(checkpoint, folder, "--labels", "balanced")) == 0
    _, labels = load_samples(folder)
    assert np.bincount(labels, minlength=5).tolist() == [2, 2, 2, 2, 2]
    code = evaluate_fid.main(sample_args(checkpoint, folder, "--labels", "balanced", "--seed", "1"))
    assert code == 2


def write_image_folder(root, count, seed):
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((20, 24, 3)) * 255 * (0.3 + 0.7 * (i % 3) / 2)).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def test_reference_mode_and_metrics_match_a_direct_computation(
    checkpoint, tmp_path, weights_file, capsys
):
    write_image_folder(tmp_path / "images", 12, seed=0)
    ref = tmp_path / "ref.npz"
    weights = ["--inception-weights", str(weights_file), "--device", "cpu"]
    assert evaluate_fid.main(["--make-ref", str(ref), "--images", str(tmp_path / "images"),
                              "--image-size", "16", *weights]) == 0  # fmt: skip
    reference = load_reference(str(ref))
    assert reference.mu.shape == (2048,) and reference.sigma.shape == (2048, 2048)
    assert reference.num_images == 12

    samples_dir = tmp_path / "samples"
    out_json = tmp_path / "metrics.json"
    args = sample_args(
        checkpoint, samples_dir, "--ref", str(ref), "--json", str(out_json), *weights
    )
    assert evaluate_fid.main(args) == 0
    report = json.loads(out_json.read_text())
    assert "| FID |" in capsys.readouterr().out
    assert report["sampler"]["method"] == "ddpm" and report["cfg_scale"] == 2.0
    assert report["labels"] == "uniform" and report["num_samples"] == 10

    # a second code path: metrics.evaluate on the same arrays, the reference from the images
    extractor = InceptionFeatures(weights_path=weights_file)
    images, _ = load_samples(samples_dir)
    direct = evaluate([images[:5], images[5:]], reference, extractor, progress=False)
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert report["metrics"][key] == pytest.approx(direct[key], rel=1e-6, abs=1e-9), key

    # evaluating the saved sample file alone gives the same numbers
    alone = tmp_path / "alone.json"
    assert evaluate_fid.main(["--samples", str(samples_dir / "samples.npz"), "--ref", str(ref),
                              "--json", str(alone), *weights]) == 0  # fmt: skip
    assert json.loads(alone.read_text())["metrics"]["fid"] == pytest.approx(
        report["metrics"]["fid"]
    )


def test_bad_input_is_one_line_and_exit_2(checkpoint, tmp_path, weights_file, capsys):
    no_mu = tmp_path / "no_mu.npz"
    np.savez(no_mu, sigma=np.eye(3))
    floats = tmp_path / "floats.npz"
    np.savez(floats, arr_0=np.zeros((4, 8, 8, 3), np.float32))
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    weights = ["--inception-weights", str(weights_file), "--device", "cpu"]
    cases = [
        (["--samples", str(good), "--ref", str(no_mu), *weights], "mu"),
        (["--samples", str(floats), "--ref", str(ref), *weights], "uint8"),
        (["--samples", str(good), "--ref", str(ref), "--inception-weights", "/nope.pth"], "nope"),
        (sample_args(checkpoint, tmp_path / "s", "--sampler", "ode"), "does not apply"),
        (["--samples", str(tmp_path / "missing.npz"), "--ref", str(good), *weights], "missing"),
        ([], "--ckpt"),
    ]
    for argv, needle in cases:
        assert evaluate_fid.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (argv, err)


def test_help_examples_parse_and_sample_dit_xl_with_dits_guidance():
    """Each command of `evaluate_fid.py --help` parses; the official DiT-XL/2 one guides the
    first 3 channels, DiT's own rule, on which its published FIDs rest."""
    text = evaluate_fid.__doc__.replace("\\\n", " ")
    commands = [shlex.split(line) for line in text.splitlines() if "evaluate_fid.py --" in line]
    parser = evaluate_fid.build_parser()
    parsed = [parser.parse_args(words[words.index("evaluate_fid.py") + 1 :]) for words in commands]
    assert len(parsed) == 3
    (official,) = [args for args in parsed if args.ckpt == "DiT-XL-2-256x256.pt"]
    assert official.cfg_channels == 3 and official.cfg_scale == 1.5


def test_synthetic_reference_scores_with_the_demo_classifier(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("VCA_DIT_CACHE", str(tmp_path / "cache"))
    folder, out_json = tmp_path / "samples", tmp_path / "demo.json"
    argv = sample_args(checkpoint, folder, "--ref", "synthetic", "--json", str(out_json))
    assert evaluate_fid.main(argv) == 0
    result = json.loads(out_json.read_text())["metrics"]
    from metrics.demo_classifier import load_or_train

    images, labels = load_samples(folder)
    logits, _ = load_or_train(16, 5)(images)
    assert result["class_accuracy"] == pytest.approx(float(np.mean(logits.argmax(1) == labels)))
    assert result["num_samples"] == 10 and result["frechet_distance"] > 0
    assert result["real_accuracy"] > 0.9
