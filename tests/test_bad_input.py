"""The promise for bad input, across the three scripts: exit code 2, exactly one line on stderr,
no traceback, and nothing written: every file under the test's folder (an earlier run, its
checkpoints, a sample set, a grid) keeps its bytes, and no file appears."""

import hashlib
import os

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
    ]
    base = ["--ckpt", ckpt, "--num-sampling-steps", "2", "--out", str(root / "grid.png")]
    bad_sample = [
        ["--cfg-scale", "-2"], ["--cfg-scale", "nan"], ["--num-sampling-steps", "0"],
        ["--per-class", "0"], ["--batch-size", "0"], ["--out", str(root / "file" / "g.png")],
        ["--save-each", str(root / "file")], ["--class-labels", "99"],
        ["--ckpt", str(root / "missing.pt")], ["--ckpt", str(root / "file")],
        ["--sampler", "ode"], ["--cfg-channels", "9"], ["--model", "DiT-B/4"],
        ["--attention", "vca"], ["--device", "cuda:99"], ["--sampler", "nope"],
    ]  # fmt: skip
    cases += [("sample", base + extra) for extra in bad_sample]
    draw = ["--ckpt", ckpt, "--num-samples", "4", "--num-sampling-steps", "2"]
    samples = str(root / "samples.npz")
    bad_eval = [
        draw + ["--num-samples", "0"], draw + ["--num-samples", "-3"],
        draw + ["--batch-size", "0"], draw + ["--shard-size", "0"],
        draw + ["--eval-batch-size", "0"], draw + ["--ref", str(root / "missing-ref.npz")],
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
    return cases


SCRIPTS = {"train": train, "sample": sample, "evaluate_fid": evaluate_fid}


def test_catalogue_of_bad_invocations(world, capsys):
    cases = catalogue(world)
    assert len(cases) >= 40
    before = tree(world)
    failures = []
    for script, argv in cases:
        try:
            code = SCRIPTS[script].main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        if code != 2 or len(lines) != 1 or "Traceback" in err or "error" not in err:
            failures.append(f"{script} {' '.join(map(str, argv[-4:]))}: code {code}, {err!r}")
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
