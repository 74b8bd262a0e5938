"""The promise for bad input, across the three scripts: exit code 2, exactly one line on stderr,
no traceback, no advice to load a file unsafely, and nothing written: every file under the
test's folder (an earlier run, its checkpoints, a sample set, a grid) keeps its bytes, and no
file appears. Where a check must come before a download or a slow load (an official checkpoint,
the VAE, Inception), the case names the words its line must hold: those of the check, not of
the download that no network here could make."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_train import tiny_args

import evaluate_fid
import sample
import train


def tiny_train(results, *extra):
    return tiny_args(results, *extra, steps=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished run, a folder of unreadable checkpoints, a grid, a sample set folder, a
    samples file and a plain file to put paths under."""
    root = tmp_path_factory.mktemp("world")
    torch.set_num_threads(1)
    assert train.main(tiny_train(root / "run")) == 0
    (root / "broken" / "checkpoints").mkdir(parents=True)
    (root / "broken" / "checkpoints" / "0000001.pt").write_bytes(b"torn")
    (root / "grid.png").write_bytes(b"an earlier grid")
    (root / "file").write_text("a plain file")
    images = np.zeros((4, 16, 16, 3), np.uint8)
    np.savez(root / "samples.npz", arr_0=images, arr_1=np.zeros(4, np.int64))
    ckpt = str(root / "run" / "checkpoints" / "0000002.pt")
    flags = ["--ckpt", ckpt, "--num-samples", "4", "--batch-size", "4", "--shard-size", "2",
             "--num-sampling-steps", "2", "--sample-dir", str(root / "set")]  # fmt: skip
    assert evaluate_fid.main(flags) == 0  # a sample set drawn with shard size 2
    return root


def tree(root) -> dict:
    return {
        os.path.relpath(os.path.join(folder, name), root): hashlib.sha256(
            open(os.path.join(folder, name), "rb").read()
        ).hexdigest()
        for folder, _, names in os.walk(root)
        for name in names
    }


def catalogue(root):
    run, ckpt = root / "run", str(root / "run" / "checkpoints" / "0000002.pt")
    new = root / "new-run"
    bad_train = [
        ["--lr", "-1"], ["--lr", "nan"], ["--lr", "inf"], ["--num-workers", "-1"],
        ["--max-steps", "0"], ["--max-steps", "-5"], ["--ema-decay", "2"],
        ["--grad-clip", "-1"], ["--global-batch-size", "0"], ["--image-size", "0"],
        ["--image-size", "18"], ["--model", "DiT-Q/2"], ["--attention", "linear"],
        ["--ema-decy", "0.9"], ["--data-path", "/nonexistent/data"], ["--num-classes", "0"],
        ["--preview-count", "0"], ["--log-every", "0"], ["--ckpt-every", "0"],
        ["--keep-checkpoints", "-1"], ["--noise-schedule", "quadratic"],
        ["--global-batch-size", "4096"], ["--attention", "vca", "--contrast-grid", "0"],
        ["--sampler", "ode"], ["--vae", "/no/such/vae"], ["--resume", str(root / "run")],
        ["--resume", str(root / "missing.pt")], ["--results-dir", str(root / "file" / "run")],
    ]  # fmt: skip
    cases = [("train", tiny_train(new, *extra)) for extra in bad_train]
    cases += [
        ("train", tiny_train(run)),  # another run's checkpoints, no --resume
        ("train", tiny_train(root / "broken", "--resume")),  # only unreadable checkpoints
        # the SD VAE, not in this machine's cache, would be downloaded before the size check
        ("train", tiny_train(new, "--image-size", "250", "--vae", "ema"), "--image-size 250"),
    ]
    base = ["--ckpt", ckpt, "--num-sampling-steps", "2", "--out", str(root / "grid.png")]
    bad_sample = [
        ["--cfg-scale", "-2"], ["--cfg-scale", "nan"], ["--num-sampling-steps", "0"],
        ["--per-class", "0"], ["--batch-size", "0"], ["--out", str(root / "file" / "g.png")],
        ["--save-each", str(root / "file")], ["--class-labels", "99"],
        ["--ckpt", str(root / "missing.pt")],
        ["--sampler", "ode"], ["--cfg-channels", "9"], ["--model", "DiT-B/4"],
        ["--attention", "vca"], ["--device", "cuda:99"], ["--sampler", "nope"],
    ]  # fmt: skip
    cases += [("sample", base + extra) for extra in bad_sample]
    # an official name: its 2.7 GB download would come before the sampler's check
    official = ["--ckpt", "DiT-XL-2-256x256.pt", "--ckpt-cache", str(root / "cache")]
    cases += [
        ("sample", base + official + ["--num-sampling-steps", "0"], "--num-sampling-steps"),
        ("sample", base + ["--ckpt", str(run)], "is a directory, not a checkpoint file"),
        ("sample", base + ["--ckpt", str(root / "file")], "not a file torch can load safely"),
    ]
    draw = ["--ckpt", ckpt, "--num-samples", "4", "--num-sampling-steps", "2"]
    samples = str(root / "samples.npz")
    bad_eval = [
        draw + ["--num-samples", "0"], draw + ["--num-samples", "-3"],
        draw + ["--batch-size", "0"], draw + ["--shard-size", "0"],
        draw + ["--eval-batch-size", "0"],
        draw + ["--ref", samples], draw + ["--sample-dir", str(root / "file" / "set")],
        draw + ["--sample-dir", str(root / "set"), "--shard-size", "3"],
        draw + ["--json", str(root / "file" / "m.json")],
        ["--samples", str(root / "missing.npz"), "--ref", "synthetic"],
        ["--samples", samples], ["--samples", str(root / "file"), "--ref", "synthetic"],
        [], ["--make-ref", str(root / "ref.npz")],
        ["--make-ref", str(root / "file" / "ref.npz"), "--images", samples],
        ["--make-ref", str(root / "ref.npz"), "--images", str(root / "no-images")],
    ]  # fmt: skip
    cases += [("evaluate_fid", argv) for argv in bad_eval]
    cases += [
        ("evaluate_fid", draw + official + ["--num-sampling-steps", "1"], "--num-sampling-steps"),
        ("evaluate_fid", ["--samples", samples, "--ref", str(root / "file")], "not an .npz file"),
        ("evaluate_fid", draw + ["--ref", str(root / "missing-ref.npz")], "--make-ref OUT.npz"),
        ("evaluate_fid", ["--samples", str(root / "grid.png"), "--ref", "synthetic"],
         "--samples takes an .npz sample file"),
        # Inception (downloaded on first use) would load before the folder's missing size
        ("evaluate_fid", ["--make-ref", str(root / "ref.npz"), "--images", str(root / "set")],
         "needs --image-size"),
    ]  # fmt: skip
    return cases


SCRIPTS = {"train": train, "sample": sample, "evaluate_fid": evaluate_fid}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_catalogue_of_bad_invocations(world, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no case may reach the hub, whatever it holds
    cases = catalogue(world)
    assert len(cases) >= 40
    before = tree(world)
    failures = []
    for script, argv, *words in cases:
        try:
            code = SCRIPTS[script].main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        unsafe = "weights_only=False" in err or "allow_pickle" in err
        if code != 2 or len(lines) != 1 or "Traceback" in err or "error" not in err or unsafe:
            failures.append(f"{script} {' '.join(map(str, argv[-4:]))}: code {code}, {err!r}")
        elif words and words[0] not in err:
            failures.append(f"{script} {' '.join(map(str, argv[-4:]))}: not {words[0]!r}: {err!r}")
        if tree(world) != before:
            failures.append(f"{script} {argv[-4:]} changed files")
            before = tree(world)
    assert not failures, "\n".join(failures)


def test_corrupt_image_read_by_a_dataloader_worker_is_one_line(tmp_path, capsys):
    """The worker's error comes back wrapped with its whole traceback; the user sees one line
    naming the file."""
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (20, 20), "red").save(tmp_path / "images" / name / f"{i}.png")
    (tmp_path / "images" / "dog" / "0.png").write_bytes(b"not a png")
    argv = tiny_train(tmp_path / "run", "--data-path", str(tmp_path / "images"))
    argv[argv.index("--num-workers") + 1] = "2"
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "cannot read image" in err and "0.png" in err


def test_a_vae_that_cannot_be_loaded_is_one_line_without_library_warnings(tmp_path):
    """As a user runs it: stderr holds the error alone, not the deprecation notices of the hub
    calls diffusers makes."""
    argv = tiny_train(tmp_path / "run", "--vae", "nobody-vca/no-such-vae")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "train.py", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "hf download nobody-vca/no-such-vae" in proc.stderr
    assert not (tmp_path / "run").exists()
