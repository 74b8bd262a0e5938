"""train.py end to end on the CPU: tiny models, 16-32 px images, a few steps each."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import train
from engine.checkpoint import list_checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_args(results, *extra, steps=4, data="synthetic:32"):
    return [
        "--data-path", data, "--image-size", "16", "--vae", "none", "--model", "DiT-T/4",
        "--global-batch-size", "8", "--num-workers", "0", "--log-every", "1",
        "--max-steps", str(steps), "--ckpt-every", "1000", "--results-dir", str(results), *extra,
    ]  # fmt: skip


def checkpoint_at(results, step):
    path = os.path.join(results, "checkpoints", f"{step:07d}.pt")
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_states_equal(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def read_metrics(results):
    with open(os.path.join(results, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("model", ["DiT-T/4", "SiT-T/4"])
def test_resume_is_exact(tmp_path, model):
    """3 steps, stop, resume to 6 == 6 steps in one go (bit-identical model, EMA, optimizer).
    8 images per batch over 32 images: the resumed part crosses an epoch boundary."""
    one_go, split = tmp_path / "one_go", tmp_path / "split"
    extra = ["--model", model, "--attention", "vca", "--ema-decay", "0.9"]
    assert train.main(tiny_args(one_go, *extra, steps=6)) == 0
    assert train.main(tiny_args(split, *extra, steps=3)) == 0
    assert train.main(tiny_args(split, *extra, "--resume", steps=6)) == 0
    a, b = checkpoint_at(one_go, 6), checkpoint_at(split, 6)
    assert a["epoch"] == b["epoch"] == 1 and a["batch_in_epoch"] == b["batch_in_epoch"] == 2
    for key in ("model", "ema", "opt"):
        assert_states_equal(a[key], b[key])
    assert not torch.equal(
        a["model"]["blocks.0.attn.qkv.weight"], a["ema"]["blocks.0.attn.qkv.weight"]
    )
    losses_a = [r["loss"] for r in read_metrics(one_go)]
    losses_b = [r["loss"] for r in read_metrics(split)]
    assert losses_a == losses_b  # the curve continues as if never stopped


def test_resume_and_compile_do_what_their_help_says(tmp_path):
    """--resume in a folder without checkpoints starts from step 0, as its help says; --compile
    names what engine.precision.compile_blocks compiles: each block, not the whole model."""
    text = " ".join(train.build_parser().format_help().split())
    assert "auto starts from step 0 when the folder has no checkpoint yet" in text
    assert "torch.compile each transformer block in place" in text
    assert train.main(tiny_args(tmp_path, "--resume", steps=1)) == 0
    assert "no checkpoint yet, starting from scratch" in (tmp_path / "log.txt").read_text()


def test_checkpoint_contents_and_pruning(tmp_path):
    assert train.main(tiny_args(tmp_path, "--ckpt-every", "1", "--keep-checkpoints", "2")) == 0
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [3, 4]
    state = checkpoint_at(tmp_path, 4)  # weights_only=True: plain types only
    assert {"model", "ema", "opt", "step", "epoch", "batch_in_epoch", "config", "rng"} <= set(state)
    assert state["step"] == 4 and state["config"]["model"]["name"] == "DiT-T/4"
    assert os.path.exists(tmp_path / "loss.png") and os.path.exists(tmp_path / "log.txt")
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_sigterm_writes_checkpoint_and_exits_zero(tmp_path):
    cmd = [sys.executable, "train.py", *tiny_args(tmp_path, steps=100_000)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    steps = [step for step, _ in list_checkpoints(tmp_path / "checkpoints")]
    assert len(steps) == 1 and steps[0] >= 2
    assert b"SIGTERM" in out
    assert train.main(tiny_args(tmp_path, "--resume", "auto", steps=steps[0] + 2)) == 0
    assert checkpoint_at(tmp_path, steps[0] + 2)["step"] == steps[0] + 2


@pytest.mark.parametrize(
    "model,attention",
    [("DiT-T/4", "mhsa"), ("DiT-T/4", "vca"), ("SiT-T/4", "mhsa"), ("SiT-T/4", "vca")],
)
def test_loss_goes_down_on_builtin_dataset(tmp_path, model, attention):
    args = tiny_args(tmp_path, "--model", model, "--attention", attention, "--lr", "1e-3",
                     "--global-batch-size", "32", steps=60, data="synthetic:640")  # fmt: skip
    assert train.main(args) == 0
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)


def make_tiny_vae(folder):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=32,
    )  # fmt: skip
    vae.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("kernel", ["auto", "aten"])
def test_compiled_vca_training_with_maps_in_parts_equals_eager(tmp_path, monkeypatch, kernel):
    """train.py --compile (inductor) of a VCA model whose maps run in parts, as CUDA's default
    run does once the per-GPU batch crosses the part minimum (lowered here): it trains, and its
    losses equal eager training's. `auto` traces the products; `aten` compiles the op, whose
    backward then runs in parts."""
    from models import attention

    monkeypatch.setitem(attention.MIN_PART_ENTRIES, "cpu", 1)
    monkeypatch.setattr(attention, "stream_kernel", kernel)
    losses = {}
    for mode in ("--no-compile", "--compile"):
        run = tmp_path / mode
        assert train.main(tiny_args(run, "--attention", "vca", mode, steps=3)) == 0
        losses[mode] = [record["loss"] for record in read_metrics(run) if "loss" in record]
    assert len(losses["--compile"]) == 3
    np.testing.assert_allclose(losses["--compile"], losses["--no-compile"], rtol=1e-4)


def test_training_in_vae_latent_space_on_the_fly_and_cached(tmp_path):
    vae = make_tiny_vae(tmp_path / "vae")
    common = ["--vae", vae, "--image-size", "32", "--preview-count", "4", "--sample-every", "3"]
    on_the_fly = tmp_path / "fly"
    assert train.main(tiny_args(on_the_fly, *common, steps=3)) == 0
    cache = tmp_path / "cache"
    cached = tmp_path / "cached"
    assert train.main(tiny_args(cached, *common, "--latent-cache", str(cache), steps=3)) == 0
    assert os.listdir(cache)
    state = checkpoint_at(cached, 3)
    # VAE factor 2 on 32 px: 16 x 16 latents with 4 channels, patch 4 -> 16 tokens
    assert state["model"]["x_embedder.proj.weight"].shape[1] == 4
    assert state["model"]["pos_embed"].shape[1] == 16
    from PIL import Image

    grid = Image.open(on_the_fly / "samples" / "0000003.png")
    assert grid.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)


def test_two_process_torchrun_identical_weights_and_mean_loss(tmp_path):
    """Both ranks end with the same weights; the logged loss is the mean of the ranks' losses."""
    script = tmp_path / "run_rank.py"
    script.write_text(
        "import json, os, sys, torch\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "import train\n"
        "from engine.trainer import Trainer\n"
        "config = train.config_from_args(train.build_parser().parse_args(sys.argv[1:]))\n"
        "trainer = Trainer(config)\n"
        "seen = []\n"
        "losses = trainer.train_step.objective.training_losses\n"
        "def spy(*a, **k):\n"
        "    out = losses(*a, **k)\n"
        "    seen.append(out['loss'].mean().item())\n"
        "    return out\n"
        "trainer.train_step.objective.training_losses = spy\n"
        "trainer.run()\n"
        "rank = trainer.info.rank\n"
        "out = config.results_dir\n"
        "torch.save(trainer.model.state_dict(), os.path.join(out, f'rank{rank}.pt'))\n"
        "json.dump(seen, open(os.path.join(out, f'losses{rank}.json'), 'w'))\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), *tiny_args(tmp_path, steps=3)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert_states_equal(w0, w1)
    l0 = json.loads((tmp_path / "losses0.json").read_text())
    l1 = json.loads((tmp_path / "losses1.json").read_text())
    assert l0 != l1  # the ranks saw different data
    logged = [r["loss"] for r in read_metrics(tmp_path)]
    assert logged == pytest.approx([(a + b) / 2 for a, b in zip(l0, l1, strict=True)], rel=1e-5)


BAD_INPUTS = [
    (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--num-workers", "-1"], "--num-workers must be 0 or more"),
    (["--ema-decay", "1.5"], "--ema-decay must be in [0, 1]"),
    (["--contrast-grid", "0", "--attention", "vca"], "contrast_grid positive"),
    (["--data-path", "/nonexistent/imagenet"], "/nonexistent/imagenet"),
    (["--image-size", "18"], "not divisible by 4"),
    (["--model", "DiT-M/2"], "unknown model"),
    (["--global-batch-size", "4096"], "fewer than one batch"),
    (["--sampler", "ode"], "does not apply to DiT"),
    (["--vae", "/nonexistent/vae"], "/nonexistent/vae"),
]


@pytest.mark.parametrize("extra,needle", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, needle):
    try:
        code = train.main(tiny_args(tmp_path / "run", *extra))
    except SystemExit as exit_:  # argparse rejects flags itself
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert needle in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_class_index_beyond_num_classes(tmp_path, capsys):
    from PIL import Image

    for name in ("cat", "dog", "fox"):
        (tmp_path / "images" / name).mkdir(parents=True)
        Image.new("RGB", (20, 20), "red").save(tmp_path / "images" / name / "a.png")
    args = tiny_args(
        tmp_path / "run", "--data-path", str(tmp_path / "images"), "--num-classes", "2"
    )
    assert train.main(args) == 2
    assert "--num-classes" in capsys.readouterr().err


def test_empty_dataset_and_misspelled_flag(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train.main(tiny_args(tmp_path / "run", "--data-path", str(tmp_path / "empty"))) == 2
    with pytest.raises(SystemExit) as exit_:
        train.main(tiny_args(tmp_path / "run", "--ema-decy", "0.9"))
    assert exit_.value.code == 2
    assert "unrecognized arguments: --ema-decy" in capsys.readouterr().err


def test_resume_from_a_different_model_is_refused(tmp_path, capsys):
    assert train.main(tiny_args(tmp_path, steps=1)) == 0
    before = checkpoint_at(tmp_path, 1)
    code = train.main(tiny_args(tmp_path, "--attention", "vca", "--resume", steps=2))
    assert code == 2
    assert "different model" in capsys.readouterr().err
    assert_states_equal(checkpoint_at(tmp_path, 1)["model"], before["model"])


def test_cli_exit_code_in_a_real_process(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", *tiny_args(tmp_path, "--data-path", str(tmp_path / "no"))],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error:")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """lr 1e30 sends the weights to inf after the first update: step 2's loss is not finite."""
    args = tiny_args(tmp_path, "--lr", "1e30", "--ckpt-every", "1", steps=5)
    assert train.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite" in err[0] and "0000001.pt" in err[0]
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [1]
    state = checkpoint_at(tmp_path, 1)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_preview_grid_equals_sample_py_grid(tmp_path, capsys):
    """The preview is drawn by sample.py's loop: the same checkpoint, labels, seed, sampler and
    guidance give the same pixels."""
    import sample

    def read_png(path):
        return np.asarray(Image.open(path).convert("RGB"))

    flags = ["--num-sampling-steps", "5", "--sampler", "ddpm"]  # per-step noise too
    preview = ["--sample-every", "2", "--preview-count", "6", "--preview-cfg", "1.5"]
    args = tiny_args(tmp_path, *preview, "--ckpt-every", "2", "--global-seed", "3", *flags, steps=2)
    assert train.main(args) == 0
    out = tmp_path / "grid.png"
    code = sample.main(
        ["--ckpt", str(tmp_path / "checkpoints" / "0000002.pt"), "--class-labels", *"012345",
         "--seed", "3", "--cfg-scale", "1.5", "--nrow", "3", "--out", str(out), *flags]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    preview = read_png(tmp_path / "samples" / "0000002.png")
    np.testing.assert_array_equal(preview, read_png(out))
    assert preview.std() > 0


def older_format(path, flags):
    """Rewrite a checkpoint as the code before the configs wrote it: train.py's flags as a flat
    "args" dict (num_classes, precision and compile resolved) instead of "config"."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    args = vars(train.build_parser().parse_args(flags))
    args.update(num_classes=10, precision="fp32", compile=False)
    del state["config"]
    state["args"] = args
    torch.save(state, path)


def test_checkpoints_from_before_the_configs_sample_and_resume_exactly(tmp_path, capsys):
    """A checkpoint in the earlier format (flat "args") loads in sample.py and resumes: 2 + 2
    steps from it equal 4 steps in one go."""
    import sample

    one_go, split = tmp_path / "one", tmp_path / "split"
    assert train.main(tiny_args(one_go, steps=4)) == 0
    first = tiny_args(split, "--ckpt-every", "2", steps=2)
    assert train.main(first) == 0
    older_format(split / "checkpoints" / "0000002.pt", first)
    grid = tmp_path / "g.png"
    ckpt = str(split / "checkpoints" / "0000002.pt")
    assert sample.main(["--ckpt", ckpt, "--num-sampling-steps", "3", "--out", str(grid)]) == 0
    assert "DiT-T/4 (mhsa, ema)" in capsys.readouterr().out
    assert train.main(tiny_args(split, "--resume", steps=4)) == 0
    assert_states_equal(checkpoint_at(one_go, 4)["model"], checkpoint_at(split, 4)["model"])
    assert train.main(tiny_args(split, "--attention", "vca", "--resume", ckpt, steps=6)) == 2
    assert "different model (attention: checkpoint 'mhsa' vs now 'vca')" in capsys.readouterr().err


def test_cosine_noise_schedule_trains(tmp_path):
    """--noise-schedule cosine is offered by the parser, so it must train (ADM's cosine)."""
    assert train.main(tiny_args(tmp_path, "--noise-schedule", "cosine", steps=2)) == 0
    state = checkpoint_at(tmp_path, 2)
    assert state["config"]["objective"]["noise_schedule"] == "cosine"
    assert all(r["loss"] == r["loss"] for r in read_metrics(tmp_path))  # finite, not nan
