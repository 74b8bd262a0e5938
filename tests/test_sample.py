"""sample.py and engine/loading.py on the CPU: tiny models saved as a training checkpoint, as
official-format bare state dicts and as safetensors, with the pixel codec and a tiny random VAE;
grids checked pixel by pixel against the single images and against engine.sampling.generate
called directly; each bad input ends in one line and exit code 2."""

import argparse
import json
import os
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import save_file

import diffusion
import sample
import train
import transport
from engine import loading
from engine.errors import UsageError
from engine.sampling import (
    SamplerSpec,
    add_sampler_args,
    generate,
    index_generators,
    index_noise,
)
from models import create_model
from models.codec import PixelCodec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Adaptive dopri5 (the ode default) takes many steps on random weights: one test covers it.
FAST = ["--device", "cpu", "--num-sampling-steps", "4", "--ode-method", "euler"]


@pytest.fixture(scope="module", autouse=True)
def cpu_settings():
    """One thread: tiny models gain nothing from more, and on a shared 2-core machine spinning
    OpenMP workers cost several times the CPU. The TF32 flags that --precision sets are put
    back for the tests that follow."""
    threads = torch.get_num_threads()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def random_state(name, seed, **kwargs) -> dict:
    """A tiny model's state dict, its initial weights perturbed so no tensor is zero (DiT
    zero-inits its heads, which would make every sampler return the same thing)."""
    torch.manual_seed(seed)
    model = create_model(name, input_size=16, num_classes=10, in_channels=3, **kwargs)
    return perturbed(model)


def perturbed(model) -> dict:
    return {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> checkpoint path, one per supported format."""
    root = tmp_path_factory.mktemp("ckpts")
    results = root / "run"
    argv = [
        "--model", "DiT-T/4", "--data-path", "synthetic:16", "--image-size", "16",
        "--vae", "none", "--global-batch-size", "8", "--num-workers", "0", "--max-steps", "2",
        "--lr", "1e-2", "--ema-decay", "0.5", "--results-dir", str(results),
    ]  # fmt: skip
    assert train.main(argv) == 0
    paths = {"trained": str(results / "checkpoints" / "0000002.pt")}

    paths["dit"] = str(root / "DiT-T-4-tiny.pt")
    torch.save(random_state("DiT-T/4", 1), paths["dit"])
    paths["sit"] = str(root / "SiT-T-4-tiny.pt")  # 6-channel head, as SiT's released file
    torch.save(random_state("SiT-T/4", 2, learn_sigma=True), paths["sit"])

    paths["safetensors"] = str(root / "vca.safetensors")
    args = {"model": "SiT-T/4", "attention": "vca", "contrast_grid": 2, "vae": "none"}
    args["path_type"] = "GVP"
    state = random_state("SiT-T/4", 3, attention="vca", contrast_grid=2)
    save_file(state, paths["safetensors"], metadata={"args": json.dumps(args)})

    vae_dir = root / "vae"
    torch.manual_seed(4)
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=16,
    ).save_pretrained(vae_dir)  # fmt: skip
    paths["vae"] = str(vae_dir)
    torch.manual_seed(5)
    latent_model = create_model("DiT-T/4", input_size=8, num_classes=10, in_channels=4)
    paths["latent"] = str(root / "DiT-T-4-latent.safetensors")  # no metadata: shapes only
    save_file(perturbed(latent_model), paths["latent"])
    return paths


def run(capsys, *argv):
    """sample.main in-process: (exit code, stdout, stderr)."""
    code = sample.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def tiles(grid: np.ndarray, count: int, nrow: int, side: int) -> list[np.ndarray]:
    """Cut a make_grid image (padding 2) back into its tiles."""
    out = []
    for i in range(count):
        r, c = divmod(i, nrow)
        top, left = 2 + r * (side + 2), 2 + c * (side + 2)
        out.append(grid[top : top + side, left : left + side])
    return out


@pytest.mark.parametrize("fmt", ["trained", "dit", "sit", "safetensors", "latent"])
def test_grid_layout_and_tiles_equal_single_images(ckpts, tmp_path, capsys, fmt):
    """3 labels x 2 per class in rows of 4: a 4 x 2 grid of 16 px tiles, each tile byte-equal to
    the PNG written for it, images distinct, files named by index and label."""
    extra = ["--vae", ckpts["vae"]] if fmt == "latent" else []
    out, each = tmp_path / "grid.png", tmp_path / "each"
    code, stdout, err = run(
        capsys, "--ckpt", ckpts[fmt], *FAST, *extra, "--class-labels", 3, 1, 7,
        "--per-class", 2, "--nrow", 4, "--out", out, "--save-each", each,
    )  # fmt: skip
    assert code == 0, err
    assert f"wrote {out}" in stdout
    grid = read_png(out)
    assert grid.shape == (2 * (16 + 2) + 2, 4 * (16 + 2) + 2, 3)
    names = sorted(os.listdir(each))
    assert names == [f"{i:04d}-{y}.png" for i, y in enumerate([3, 3, 1, 1, 7, 7])]
    singles = [read_png(each / name) for name in names]
    for tile, single in zip(tiles(grid, 6, 4, 16), singles, strict=True):
        assert single.shape == (16, 16, 3)
        np.testing.assert_array_equal(tile, single)
    assert len({s.tobytes() for s in singles}) == 6
    assert (grid[:2] == 255).all() and (grid[:, 18:20] == 255).all()  # the padding
    assert (grid[-18:, -18:] == 255).all()  # 6 images in 8 slots: the last two stay empty


def test_load_model_reads_each_format(ckpts):
    """The architecture, family, objective and codec come from args or, without them, shapes
    and the file name; an 8-channel (here 6: pixels) SiT head loads with learn_sigma."""
    parser = argparse.ArgumentParser()
    loading.add_model_args(parser)
    add_sampler_args(parser, cfg_scale=2.5)

    def load(key, *extra):
        args = parser.parse_args(["--ckpt", ckpts[key], *extra])
        return loading.load_model(loading.CheckpointRequest.from_args(args), "cpu")

    trained = load("trained")
    assert (trained.family, trained.name, trained.attention) == ("DiT", "DiT-T/4", "mhsa")
    assert (trained.image_size, trained.num_classes, trained.vae) == (16, 10, "none")
    assert trained.latent_shape == (3, 16, 16) and not trained.model.training
    saved = torch.load(ckpts["trained"], weights_only=True)
    for key, value in trained.model.state_dict().items():
        assert torch.equal(value, saved["ema"][key]), key
    model_weights = load("trained", "--weights", "model").model.state_dict()
    head = "final_layer.linear.weight"  # zero-init, so it moved in training
    assert torch.equal(model_weights[head], saved["model"][head])
    assert not torch.equal(saved["model"][head], saved["ema"][head])

    sit = load("sit")
    assert (sit.family, sit.name) == ("SiT", "SiT-T/4")
    assert sit.model.learn_sigma and sit.model.out_channels == 6
    assert sit.model(torch.zeros(1, 3, 16, 16), torch.ones(1), torch.zeros(1).long()).shape[1] == 3
    assert (sit.objective.path_type, sit.objective.prediction) == ("Linear", "velocity")

    vca = load("safetensors")
    assert (vca.family, vca.attention, vca.objective.path_type) == ("SiT", "vca", "GVP")
    assert vca.model.blocks[0].attn.contrast_grid == (2, 2)  # from the metadata, not 8

    latent = load("latent", "--vae", ckpts["vae"])
    assert (latent.family, latent.image_size, latent.latent_shape) == ("DiT", 16, (4, 8, 8))
    assert latent.vae == ckpts["vae"] and latent.codec.downsample == 2
    assert "DiT-T/4 (mhsa, weights)" in latent.description
    assert parser.parse_args(["--ckpt", "x"]).cfg_scale == 2.5
    optional = argparse.ArgumentParser()
    loading.add_model_args(optional, ckpt_required=False)
    with pytest.raises(UsageError, match="no checkpoint given"):
        loading.load_model(loading.CheckpointRequest.from_args(optional.parse_args([])), "cpu")


@pytest.mark.parametrize(
    ("key", "which", "method", "flags"),
    [
        ("trained", "ema", "ddim", []),
        ("trained", "model", "ddpm", ["--weights", "model", "--cfg-scale", "1"]),
        ("sit", "weights", "ode", ["--ode-method", "euler"]),
        ("sit", "weights", "sde", ["--sde-method", "Heun", "--last-step", "Tweedie"]),
    ],
)
def test_images_equal_generate_called_directly(ckpts, tmp_path, capsys, key, which, method, flags):
    """The second code path: the weights taken by hand from the file, the objective from the
    diffusion/transport factories, the same index-keyed noise and seeded generator."""
    labels = [2, 5, 9]
    each = tmp_path / "each"
    code, _, err = run(
        capsys, "--ckpt", ckpts[key], *FAST, "--sampler", method, "--seed", 7, *flags,
        "--class-labels", *labels, "--out", tmp_path / "g.png", "--save-each", each,
    )  # fmt: skip
    assert code == 0, err
    raw = torch.load(ckpts[key], weights_only=True)
    state = raw[which] if which in ("ema", "model") else raw
    name = "DiT-T/4" if key == "trained" else "SiT-T/4"
    model = create_model(name, input_size=16, num_classes=10, in_channels=3, learn_sigma=True)
    model.load_state_dict(state)
    model.eval()
    if method in ("ddpm", "ddim"):
        respacing = "ddim4" if method == "ddim" else "4"
        objective = diffusion.create_diffusion(timestep_respacing=respacing)
        options = {"eta": 0.0} if method == "ddim" else {}
    else:
        objective = transport.create_transport()
        if method == "ode":
            options = {"sampling_method": "euler", "num_steps": 4, "atol": 1e-6, "rtol": 1e-3}
        else:
            options = {
                "sampling_method": "Heun", "diffusion_form": "sigma", "diffusion_norm": 1.0,
                "num_steps": 4, "last_step": "Tweedie", "last_step_size": 0.04,
            }  # fmt: skip
    cfg = 1.0 if "--cfg-scale" in flags else 4.0
    images = generate(
        model,
        objective,
        SamplerSpec(method, 4, options, cfg_scale=cfg),
        PixelCodec(),
        torch.tensor(labels),
        index_noise(range(3), 7, (3, 16, 16)),
        generator=index_generators(range(3), 7),
    )
    expected = torch.clamp(127.5 * images + 128, 0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    for i, y in enumerate(labels):
        np.testing.assert_array_equal(read_png(each / f"{i:04d}-{y}.png"), expected[i].numpy())


def grid_bytes(capsys, tmp_path, ckpt, *flags) -> bytes:
    out = tmp_path / f"g{len(os.listdir(tmp_path))}.png"
    labels = ["--class-labels", 1, 2, 3]
    code, _, err = run(capsys, "--ckpt", ckpt, *FAST, *labels, "--out", out, *flags)
    assert code == 0, err
    return out.read_bytes()


@pytest.mark.parametrize(
    ("key", "flags"),
    [("trained", ["--sampler", "ddpm"]), ("sit", ["--sampler", "sde"])],
)
def test_same_seed_same_bytes_other_seed_other_bytes(ckpts, tmp_path, capsys, key, flags):
    """Stochastic samplers too: per-step noise comes from the seeded generator."""
    first = grid_bytes(capsys, tmp_path, ckpts[key], *flags, "--seed", 3)
    assert grid_bytes(capsys, tmp_path, ckpts[key], *flags, "--seed", 3) == first
    assert grid_bytes(capsys, tmp_path, ckpts[key], *flags, "--seed", 4) != first


def test_samplers_ignore_the_batch_size(ckpts, tmp_path, capsys):
    """Initial and per-step noise are keyed to the image index, not to its batch (fixed-step
    ODE: dopri5 picks its steps from the error of the whole batch)."""
    for method in ("ddim", "ddpm", "ode", "sde"):
        key = "trained" if method in ("ddim", "ddpm") else "sit"
        whole = grid_bytes(capsys, tmp_path, ckpts[key], "--sampler", method)
        split = grid_bytes(capsys, tmp_path, ckpts[key], "--sampler", method, "--batch-size", 2)
        assert whole == split


@pytest.mark.parametrize(
    ("key", "flags"),
    [
        ("trained", ["--sampler", "ddpm", "--cfg-scale", "1"]),
        ("trained", ["--sampler", "ddim", "--ddim-eta", "0.5", "--precision", "bf16"]),
        ("sit", ["--sampler", "ode", "--ode-method", "dopri5", "--atol", "1e-3", "--rtol", "1e-2"]),
        ("sit", ["--sampler", "ode", "--ode-method", "heun", "--precision", "tf32"]),
        ("sit", ["--sampler", "sde", "--sde-method", "Euler", "--diffusion-form", "constant"]),
        ("safetensors", ["--sampler", "sde", "--sde-method", "Heun", "--last-step", "none"]),
        ("safetensors", ["--sampler", "sde", "--diffusion-form", "linear", "--last-step", "Euler"]),
    ],
)
def test_every_sampler_option_runs(ckpts, tmp_path, capsys, key, flags):
    method = flags[flags.index("--sampler") + 1]
    out = tmp_path / "g.png"
    code, stdout, err = run(capsys, "--ckpt", ckpts[key], *FAST, "--out", out, *flags)
    assert code == 0, err
    assert f"by {method}" in stdout
    # TF32 for whatever stays fp32 unless the precision is fp32 (auto is fp32 on a CPU)
    assert torch.backends.cuda.matmul.allow_tf32 == ("tf32" in flags or "bf16" in flags)
    grid = read_png(out)
    assert grid.shape == (2 * 18 + 2, 4 * 18 + 2, 3)  # 8 default labels (10-class model)
    assert grid[2:18, 2:18].std() > 0


def test_guidance_scale_and_channels_change_the_images(ckpts, tmp_path, capsys):
    """With 4 latent channels, DiT's 3-channel rule differs from guiding all of them."""
    flags = [ckpts["latent"], "--vae", ckpts["vae"], "--sampler", "ddim"]
    base = grid_bytes(capsys, tmp_path, *flags)
    assert grid_bytes(capsys, tmp_path, *flags, "--cfg-scale", "1") != base
    assert grid_bytes(capsys, tmp_path, *flags, "--cfg-channels", "3") != base
    assert grid_bytes(capsys, tmp_path, *flags, "--cfg-channels", "4") == base


BAD = [
    ("trained", ["--model", "DiT-B/4"], "holds a DiT-T/4 model, not DiT-B/4"),
    ("dit", ["--model", "DiT-S/4"], "holds a T/4-shaped network"),
    ("dit", ["--attention", "vca"], "does not match DiT-T/4 with vca attention"),
    ("trained", ["--attention", "vca"], "uses mhsa attention, not vca"),
    ("trained", ["--class-labels", "3", "10"], "class label 10 is out of range"),
    ("trained", ["--class-labels", "-1"], "class label -1 is out of range"),
    ("trained", ["--sampler", "ode"], "sampler 'ode' does not apply to DiT models"),
    ("sit", ["--sampler", "ddpm"], "sampler 'ddpm' does not apply to SiT models"),
    ("sit", ["--ode-method", "nope"], "unknown ODE sampling_method 'nope'"),
    ("sit", ["--sampler", "sde", "--num-sampling-steps", "1"], "must be at least 2, got 1"),
    ("trained", ["--num-sampling-steps", "1"], "must be at least 2, got 1"),
    ("trained", ["--image-size", "32"], "makes 16px images, not --image-size 32"),
    ("trained", ["--num-classes", "1000"], "has 10 classes, not --num-classes 1000"),
    ("trained", ["--vae", "/no/such/vae"], "no such directory"),
    ("trained", ["--cfg-channels", "4"], "--cfg-channels must be between 1 and 3"),
    ("latent", ["--vae", "none"], "takes 4-channel latents but VAE 'none' makes 3"),
    ("safetensors", ["--weights", "model", "--model", "DiT-T/4"], "holds a SiT-T/4 model"),
    ("missing", [], "does not exist"),
    ("corrupt", [], "cannot read checkpoint"),
    ("notdit", [], "is not a DiT/SiT checkpoint"),
]


@pytest.mark.parametrize(("key", "flags", "message"), BAD, ids=[m for _, _, m in BAD])
def test_bad_input_is_one_line_and_exit_2(ckpts, tmp_path, capsys, key, flags, message):
    """And the grid already at --out stays as it was."""
    paths = dict(ckpts, missing=str(tmp_path / "missing.pt"))
    paths["corrupt"] = str(tmp_path / "corrupt.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    paths["notdit"] = str(tmp_path / "other.pt")
    torch.save({"weight": torch.ones(2)}, paths["notdit"])
    out = tmp_path / "grid.png"
    out.write_bytes(b"an earlier grid")
    code, stdout, err = run(capsys, "--ckpt", paths[key], *FAST, "--out", out, *flags)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert stdout == ""
    assert out.read_bytes() == b"an earlier grid"
    assert sorted(os.listdir(tmp_path)) == ["corrupt.pt", "grid.png", "other.pt"]


def test_bad_label_as_a_real_process(ckpts, tmp_path):
    cmd = [
        sys.executable, "sample.py", "--ckpt", ckpts["trained"], *FAST,
        "--class-labels", "12", "--out", str(tmp_path / "g.png"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: class label 12 is out of range: the model has 10 classes, so labels run from 0 to 9"
    ]
    assert not (tmp_path / "g.png").exists()


def open_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def no_network(*args, **kwargs):
    raise urllib.error.URLError("offline")


def test_official_names_are_found_in_the_cache(ckpts, tmp_path, capsys, monkeypatch):
    """A pre-placed file is used without network, also through the CLI: its architecture comes
    from its shapes and its family from the name (SiT -> ode by default)."""
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    for name, source in (("DiT-XL-2-256x256.pt", "dit"), ("SiT-XL-2-256.pt", "sit")):
        cached = tmp_path / name
        cached.write_bytes(open_bytes(ckpts[source]))
        assert loading.resolve_checkpoint(name, str(tmp_path)) == str(cached)
        code, stdout, err = run(
            capsys, "--ckpt", name, "--ckpt-cache", tmp_path, *FAST, "--out", tmp_path / "g.png"
        )
        assert code == 0, err
        family, method = ("SiT", "ode") if source == "sit" else ("DiT", "ddpm")
        assert f"by {method}, {family}-T/4 (mhsa, weights) from {cached}:" in stdout
    assert loading.resolve_checkpoint(ckpts["dit"], "/nowhere") == ckpts["dit"]


def test_missing_official_name_offline_names_the_place(tmp_path, capsys, monkeypatch):
    def partial_then_fail(url, dst, progress=True):
        with open(dst, "wb") as f:
            f.write(b"half a file")
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", partial_then_fail)
    cache = tmp_path / "cache"
    code, _, err = run(capsys, "--ckpt", "DiT-XL-2-512x512.pt", "--ckpt-cache", cache, *FAST)
    assert code == 2 and err.count("\n") == 1
    assert f"put it at {cache / 'DiT-XL-2-512x512.pt'}" in err
    assert "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt" in err
    assert "Name or service not known" in err
    assert os.listdir(cache) == []  # the partial download is gone


def test_download_lands_atomically_in_the_cache(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, dst, progress=True):
        calls.append((url, dst))
        assert not os.path.exists(tmp_path / "SiT-XL-2-256.pt")  # not under the final name yet
        with open(dst, "wb") as f:
            f.write(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    path = loading.resolve_checkpoint("SiT-XL-2-256.pt", str(tmp_path))
    assert path == str(tmp_path / "SiT-XL-2-256.pt")
    assert open_bytes(path) == b"weights" and os.listdir(tmp_path) == ["SiT-XL-2-256.pt"]
    assert calls[0][0].startswith("https://www.dl.dropboxusercontent.com/scl/fi/")
    assert "SiT-XL-2-256.pt" in calls[0][0]
    loading.resolve_checkpoint("SiT-XL-2-256.pt", str(tmp_path))
    assert len(calls) == 1  # the second call finds it


def test_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VCA_DIT_CACHE", str(tmp_path))
    assert loading.default_cache_dir() == str(tmp_path / "checkpoints")
    monkeypatch.delenv("VCA_DIT_CACHE")
    assert loading.default_cache_dir() == os.path.expanduser("~/.cache/vca-dit/checkpoints")
    with pytest.raises(UsageError, match="official names DiT-XL-2-256x256.pt"):
        loading.resolve_checkpoint("DiT-XL-2-128.pt", str(tmp_path))
