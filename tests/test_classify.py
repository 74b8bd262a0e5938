"""train_classifier.py: a DeiT-T-shaped model with VCA learns the built-in shapes above chance,
resumes bit-exactly through DeiT's augmentations, evaluates the same over two processes as over
one, and refuses bad input with one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

import train_classifier
from data import SyntheticSpec
from engine.checkpoint import load_checkpoint
from engine.classification import (
    AugmentedImages,
    ClassifierConfig,
    SyntheticPIL,
    build_network,
    evaluate_classifier,
    train_transform,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(results, *extra, steps=4):
    """DeiT-T (width 192, 3 heads) at 32 px with patch 4: 64 tokens, a 4 x 4 contrast grid."""
    return ["--data-path", "synthetic:64", "--val-path", "synthetic:40", "--image-size", "32",
            "--patch-size", "4", "--attention", "vca", "--contrast-grid", "4",
            "--global-batch-size", "16", "--max-steps", str(steps), "--log-every", "1",
            "--num-workers", "0", "--no-tensorboard", "--ema-decay", "0.9",
            "--results-dir", str(results), *extra]  # fmt: skip


def test_learns_the_shapes_above_chance(tmp_path):
    """10 classes (chance 0.1); top-1 is recomputed from the final checkpoint's EMA weights."""
    results = tmp_path / "run"
    flags = tiny(results, "--data-path", "synthetic:2000", "--val-path", "synthetic:200",
                 "--global-batch-size", "32", "--lr", "1e-3", steps=25)  # fmt: skip
    assert train_classifier.main(flags) == 0
    report = json.loads((results / "eval.json").read_text())
    assert report["metrics"]["num_samples"] == 200 and report["weights"] == "ema"
    assert report["metrics"]["top1"] > 0.3
    assert report["metrics"]["top5"] >= report["metrics"]["top1"]

    state = load_checkpoint(str(results / "checkpoints" / "0000025.pt"))
    config = ClassifierConfig(**{**state["config"]["train"], "results_dir": "unused"})
    model = build_network(config, 10)
    model.load_state_dict(state["ema"])
    held_out = SyntheticPIL(32, 10, SyntheticSpec(200, shape_only=False), seed=1)
    val = AugmentedImages(held_out, _eval_transform())
    images, labels = zip(*(val[i] for i in range(len(val))), strict=True)
    with torch.no_grad():
        logits = model.eval()(torch.stack(images))
    top1 = (logits.argmax(1) == torch.tensor(labels)).sum().item() / len(labels)
    assert report["metrics"]["top1"] == pytest.approx(top1, abs=1e-9)


def _eval_transform():
    import timm.data

    return timm.data.create_transform(32, interpolation="bicubic")


def test_resume_is_bit_exact_through_mixup_randaugment_and_erasing(tmp_path):
    """A 6-step run keeping its step-3 checkpoint, against the same run resumed from that
    checkpoint (4 steps per epoch: the resume is mid-epoch and the run crosses an epoch); the
    resumed half reads its batches through a worker process."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    flags = ["--ckpt-every", "3", "--keep-checkpoints", "0"]
    assert train_classifier.main(tiny(straight, *flags, steps=6)) == 0
    shutil.copytree(straight, split)
    os.remove(split / "checkpoints" / "0000006.pt")
    resumed = tiny(split, *flags, "--resume", "--num-workers", "1", steps=6)
    assert train_classifier.main(resumed) == 0
    a = load_checkpoint(str(straight / "checkpoints" / "0000006.pt"))
    b = load_checkpoint(str(split / "checkpoints" / "0000006.pt"))
    for part in ("model", "ema"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)
    for index, state in a["opt"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["opt"]["state"][index][key])
    assert "resumed from" in (split / "log.txt").read_text()
    lines = (split / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if "loss" in line]
    assert steps == list(range(1, 7))


def test_two_processes_evaluate_every_image_once(tmp_path):
    """torchrun with 2 CPU processes: the sharded top-1 equals one process scoring the same
    checkpoint's weights."""
    results = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train_classifier.py", *tiny(results, "--ema-decay", "0", steps=2)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((results / "eval.json").read_text())
    assert report["metrics"]["num_samples"] == 40
    state = load_checkpoint(str(results / "checkpoints" / "0000002.pt"))
    config = ClassifierConfig(**{**state["config"]["train"], "results_dir": "unused"})
    model = build_network(config, 10)
    model.load_state_dict(state["model"])
    held_out = SyntheticPIL(32, 10, SyntheticSpec(40, shape_only=False), seed=1)
    val = AugmentedImages(held_out, _eval_transform())
    alone = evaluate_classifier(model, val, 16, torch.device("cpu"))
    assert report["metrics"]["top1"] == pytest.approx(alone["top1"], abs=1e-12)
    assert report["metrics"]["top5"] == pytest.approx(alone["top5"], abs=1e-12)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "resnet50"], "unsupported timm model"),
        (["--model", "deit_tiny"], "unknown or unsupported timm model 'deit_tiny'"),
        (["--attention", "linear"], "invalid choice"),
        (["--mixup", "-1"], "--mixup"),
        (["--label-smoothing", "nan"], "--label-smoothing"),
        (["--lr", "0"], "--lr"),
        (["--image-size", "30"], "cannot take 30 px"),
        (["--global-batch-size", "15"], "even"),
        (["--data-path", "/nonexistent/images"], "does not exist"),
        (["--pretrained", "/nonexistent/weights.pth"], "no such file"),
        (["--max-steps", "0"], "--max-steps"),
        (["--crop-scale", "0"], "--crop-scale"),
        (["--data-path", "synthetic-shape:64", "--num-classes", "11"], "1..10 classes"),
        (["--data-path", "synthetic-shape:64", "--val-path", "synthetic:64"], "differently"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    results = tmp_path / "run"
    try:
        code = train_classifier.main(tiny(results, *extra))
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert "Traceback" not in err and not results.exists()


def test_sigterm_writes_a_checkpoint_and_exits_zero(tmp_path, monkeypatch):
    """The shared loop's preemption path: a SIGTERM during step 3 of 50 saves step 3, exits 0."""
    from engine.classification import ClassifierTrainer

    before_step = ClassifierTrainer.before_step

    def signalling(self):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        before_step(self)

    monkeypatch.setattr(ClassifierTrainer, "before_step", signalling)
    try:
        assert train_classifier.main(tiny(tmp_path / "run", "--ckpt-every", "100", steps=50)) == 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["0000003.pt"]
    assert "SIGTERM" in (tmp_path / "run" / "log.txt").read_text()


def test_a_second_run_in_a_busy_folder_is_refused_until_the_first_ends(tmp_path, capsys):
    """The shared loop's folder lock, between two real processes: while a run trains, another
    in its folder exits 2 with one line and writes nothing; once the first has ended (SIGTERM),
    the folder resumes."""
    results = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "train_classifier.py", *tiny(results, "--ckpt-every", "1000", steps=500)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        log = results / "log.txt"
        for _ in range(600):
            if log.exists() and "step 0000001" in log.read_text():
                break
            time.sleep(0.2)
        before = log.read_text()
        assert train_classifier.main(tiny(results, "--resume")) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "in use by another running process" in err, err
        assert log.read_text().startswith(before) and not (results / "checkpoints").exists()
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0, first.stderr.read()[-2000:]
    (saved,) = os.listdir(results / "checkpoints")
    assert train_classifier.main(tiny(results, "--resume", steps=int(saved[:7]) + 1)) == 0
    assert "resumed from" in log.read_text()


def test_pretrained_file_loads_through_timm_and_the_log_names_the_new_keys(tmp_path):
    """A timm state dict (nested under "state_dict", as timm's own checkpoints are) starts a
    VCA run: every tensor that fits is loaded, and log.txt names VCA's own parameters."""
    args = train_classifier.build_parser().parse_args(tiny(tmp_path / "unused"))
    config = replace(train_classifier.config_from_args(args), attention="native")
    torch.manual_seed(1)
    native = build_network(config, 10)
    torch.save({"state_dict": native.state_dict()}, tmp_path / "native.pth")
    results = tmp_path / "run"
    flags = tiny(results, "--pretrained", str(tmp_path / "native.pth"), "--lr", "1e-12",
                 "--min-lr", "0", steps=1)  # fmt: skip
    assert train_classifier.main(flags) == 0
    log = (results / "log.txt").read_text()
    assert "keys loaded" in log and "blocks.0.attn.mixer.contrast_pos" in log
    state = load_checkpoint(str(results / "checkpoints" / "0000001.pt"))["model"]
    torch.testing.assert_close(state["patch_embed.proj.weight"], native.patch_embed.proj.weight,
                               rtol=1e-6, atol=1e-9)  # fmt: skip


def test_recipe_flags_reach_timms_transform():
    """--crop-scale, --randaugment and --reprob as train_classifier.py parses them."""
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import RandomResizedCropAndInterpolation as RandomResizedCrop

    def steps(*extra):
        args = train_classifier.build_parser().parse_args(tiny("unused", *extra))
        return train_transform(train_classifier.config_from_args(args)).transforms

    light = steps("--crop-scale", "0.5", "--randaugment", "none", "--reprob", "0")
    (crop,) = [t for t in light if isinstance(t, RandomResizedCrop)]
    assert crop.scale == (0.5, 1.0) and crop.size == (32, 32)
    assert not any(isinstance(t, (RandAugment, RandomErasing)) for t in light)
    assert not any(isinstance(t, RandomErasing) for t in steps("--reprob", "0"))
    deit = steps()
    assert [t.scale for t in deit if isinstance(t, RandomResizedCrop)] == [(0.08, 1.0)]
    assert any(isinstance(t, RandAugment) for t in deit)
    assert any(isinstance(t, RandomErasing) for t in deit)


def test_help_keeps_its_examples_and_says_what_the_defaults_are():
    """The usage examples keep their line continuations; the recipe is DeiT's but for its
    warm-up, which the help says; and no --compile is offered, since nothing would read it."""
    text = train_classifier.build_parser().format_help()
    assert "--patch-size 4 \\\n        --model deit_tiny_patch16_224" in text
    assert train_classifier.DEFAULTS.warmup_steps == 0 and "but for its warm-up" in text
    assert "--compile" not in text
