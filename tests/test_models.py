"""The DiT/SiT backbone: registry, official parameter counts and state-dict layout, shapes,
embeddings against numpy formulas, and classifier-free guidance against separate passes."""

import math

import numpy as np
import pytest
import torch

from models import ATTENTIONS, MODEL_NAMES, DiT, create_model, parse_model_name
from models.dit import TimestepEmbedder

OFFICIAL_PARAMS = {
    "S/2": 32_963_360, "S/4": 32_945_024, "S/8": 33_148_160,
    "B/2": 130_512_416, "B/4": 130_475_648, "B/8": 130_881_536,
    "L/2": 458_102_816, "L/4": 458_053_760, "L/8": 458_594_816,
    "XL/2": 675_129_632, "XL/4": 675_074_432, "XL/8": 675_683_072,
}  # fmt: skip
WIDTHS = {
    "T": (6, 192, 4), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}  # fmt: skip


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def tiny(attention="mhsa", **opts):
    """A two-block backbone on an 8 x 8 token grid: every code path, milliseconds to run."""
    opts = {"input_size": 16, "patch_size": 2, "hidden_size": 64, "depth": 2, "num_heads": 4,
            "num_classes": 10, **opts}  # fmt: skip
    if attention != "mhsa" and attention != "diffattn":
        opts.setdefault("contrast_grid", 4)
    return DiT(attention=attention, **opts)


def randomise(model, seed=0, scale=0.05):
    """Replace the zero initialisation (adaLN-Zero, zero head) so outputs depend on everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def official_state_dict(depth, hidden, patch, out_channels, num_classes=1000, grid=16):
    """Key names and shapes of the official DiT/SiT releases, written out independently."""
    shapes = {
        "pos_embed": (1, grid * grid, hidden),
        "x_embedder.proj.weight": (hidden, 4, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (num_classes + 1, hidden),
        "final_layer.linear.weight": (patch * patch * out_channels, hidden),
        "final_layer.linear.bias": (patch * patch * out_channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * hidden, hidden), b + "attn.qkv.bias": (3 * hidden,),
            b + "attn.proj.weight": (hidden, hidden), b + "attn.proj.bias": (hidden,),
            b + "mlp.fc1.weight": (4 * hidden, hidden), b + "mlp.fc1.bias": (4 * hidden,),
            b + "mlp.fc2.weight": (hidden, 4 * hidden), b + "mlp.fc2.bias": (hidden,),
            b + "adaLN_modulation.1.weight": (6 * hidden, hidden),
            b + "adaLN_modulation.1.bias": (6 * hidden,),
        })  # fmt: skip
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}


@pytest.mark.parametrize("config", list(OFFICIAL_PARAMS))
def test_parameter_counts_equal_official(config):
    with torch.device("meta"):
        dit = create_model(f"DiT-{config}")
        sit_released = create_model(f"SiT-{config}", learn_sigma=True)
        sit = create_model(f"SiT-{config}")
    assert n_params(dit) == OFFICIAL_PARAMS[config]
    assert n_params(sit_released) == OFFICIAL_PARAMS[config]
    hidden, patch = WIDTHS[config.split("/")[0]][1], int(config.split("/")[1])
    head_saving = hidden * patch * patch * 4 + patch * patch * 4  # 4 fewer output channels
    assert n_params(sit) == OFFICIAL_PARAMS[config] - head_saving


def test_vca_parameter_overhead_is_small_for_s_models():
    with torch.device("meta"):
        base = n_params(create_model("DiT-S/2"))
        vca = n_params(create_model("DiT-S/2", attention="vca"))
        no_dwc = n_params(create_model("DiT-S/2", attention="vca", dwc=False))
    # 12 blocks x (e+, e-: 2 x 64 x 384; 2 lambdas x 4 x 64; 2 norms x 64) [+ dwc 384 x 10]
    assert no_dwc - base == 12 * (2 * 64 * 384 + 2 * 4 * 64 + 2 * 64)
    assert vca - no_dwc == 12 * (384 * 9 + 384)
    assert vca - base < 1_000_000


@pytest.mark.parametrize("family", ["DiT", "SiT"])
def test_official_state_dict_loads_strictly(family):
    depth, hidden, heads = WIDTHS["S"]
    state = official_state_dict(depth, hidden, patch=2, out_channels=8)
    model = create_model(f"{family}-S/2", learn_sigma=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    x = torch.randn(2, 4, 32, 32)
    out = model(x, torch.tensor([10.0, 500.0]), torch.tensor([1, 999]))
    assert out.shape == (2, 8 if family == "DiT" else 4, 32, 32)
    assert torch.isfinite(out).all()
    if family == "SiT":  # the released 8-channel head: SiT keeps the first 4 channels
        dit = create_model("DiT-S/2")
        dit.load_state_dict(state, strict=True)
        dit.eval()
        torch.testing.assert_close(
            out, dit(x, torch.tensor([10.0, 500.0]), torch.tensor([1, 999]))[:, :4]
        )


def test_every_registered_config_has_right_shapes():
    assert len(MODEL_NAMES) == 30
    for name in MODEL_NAMES:
        family, width, patch = parse_model_name(name)
        depth, hidden, heads = WIDTHS[width]
        with torch.device("meta"):
            model = create_model(name, input_size=32)
            out = model(torch.empty(2, 4, 32, 32), torch.zeros(2), torch.zeros(2, dtype=torch.long))
        assert len(model.blocks) == depth and model.blocks[0].attn.num_heads == heads
        assert model.x_embedder.proj.weight.shape == (hidden, 4, patch, patch)
        assert model.pos_embed.shape == (1, (32 // patch) ** 2, hidden)
        assert out.shape == (2, 8 if family == "DiT" else 4, 32, 32)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_every_attention_runs_in_the_backbone(attention):
    torch.manual_seed(0)
    model = randomise(tiny(attention, learn_sigma=False))
    x = torch.randn(3, 4, 16, 16)
    out = model(x, torch.rand(3), torch.tensor([0, 5, 9]))
    assert out.shape == (3, 4, 16, 16)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_lambda_init_follows_block_index():
    model = create_model("DiT-S/8", attention="vca", input_size=16)
    for i, block in enumerate(model.blocks):
        assert block.attn.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * i))


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'DiT-M/2'.*DiT-S/2"):
        create_model("DiT-M/2")
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        create_model("DiT-S/2", attention="flash")
    with pytest.raises(ValueError, match="not divisible"):
        create_model("DiT-S/8", input_size=12)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--models", "DiT-XL/3"], "--models: unknown model 'DiT-XL/3'"),
        (["--json", "{tmp}/missing/dir/x.json"], "missing/dir does not exist"),
        (["--json", "{tmp}/file/x.json"], "is a file, so the file cannot be made"),
        (["--json", "{tmp}"], "exists and is not a file"),
        (["--image-size", "256", "250"], "--image-size 250 makes no whole 2 x 2 patches"),
        (["--models", "DiT-S/8", "--image-size", "32"], "use a multiple of 64"),
        (["--classification", "--json", "{tmp}/missing/x.json"], "does not exist"),
    ],
)
def test_table_bad_input_is_one_line_before_anything_is_printed(tmp_path, capsys, extra, message):
    """`python -m models --table`: a bad flag ends in one line and exit 2 before any row is
    counted or printed, and writes nothing."""
    from models import __main__ as models_main

    (tmp_path / "file").write_text("a plain file")
    argv = ["--table", "--models", "DiT-S/2", *[a.format(tmp=tmp_path) for a in extra]]
    with pytest.raises(SystemExit) as exit_:
        models_main.main(argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == "", out
    assert len(err.splitlines()) == 1 and "Traceback" not in err and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_adaln_zero_initialisation():
    torch.manual_seed(0)
    model = create_model("DiT-S/4", input_size=16)
    out = model(torch.randn(2, 4, 16, 16), torch.tensor([3, 900]), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0  # zero-initialised head and gates
    w = model.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))  # xavier-uniform
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert model.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_timestep_embedding_matches_formula():
    t = torch.tensor([0.0, 1.0, 17.0, 999.0])
    emb = TimestepEmbedder.timestep_embedding(t, 256).double().numpy()
    freqs = np.exp(-np.log(10000.0) * np.arange(128) / 128)
    args = t.double().numpy()[:, None] * freqs[None]
    np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], 1), atol=2e-4)


def test_positional_embedding_matches_formula():
    model = create_model("DiT-S/4", input_size=16)  # 4 x 4 grid, 384 channels
    pos = model.pos_embed[0].double().numpy()
    quarter = 384 // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    for index in range(16):
        row, col = divmod(index, 4)
        expected = np.concatenate([
            np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)
        ])  # fmt: skip
        np.testing.assert_allclose(pos[index], expected, atol=1e-6)
    assert not model.pos_embed.requires_grad


@pytest.mark.parametrize("name", ["DiT", "SiT"])
def test_forward_with_cfg_equals_two_passes(name):
    torch.manual_seed(0)
    num_classes = 10
    model = randomise(tiny(return_sigma=name == "DiT"), scale=0.2).eval()
    assert model.y_embedder.embedding_table.num_embeddings == num_classes + 1
    half = torch.randn(2, 4, 16, 16)
    x = torch.cat([half, half])
    t = torch.tensor([100.0, 700.0, 100.0, 700.0])
    y = torch.tensor([3, 7, num_classes, num_classes])
    scale = 4.0
    with torch.no_grad():
        cond = model(half, t[:2], y[:2])
        uncond = model(half, t[:2], torch.full((2,), num_classes))
        out = model.forward_with_cfg(x, t, y, scale)
        dit_rule = model.forward_with_cfg(x, t, y, scale, cfg_channels=3)
    guided = uncond[:, :4] + scale * (cond[:, :4] - uncond[:, :4])
    assert not torch.allclose(cond, uncond, atol=1e-3)
    torch.testing.assert_close(out[:2, :4], guided, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[2:, :4], guided, rtol=1e-4, atol=1e-4)
    if name.startswith("DiT"):  # variance channels pass through from each half
        torch.testing.assert_close(out[:2, 4:], cond[:, 4:], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[2:, 4:], uncond[:, 4:], rtol=1e-4, atol=1e-4)
    # DiT's compatibility rule guides three channels; the fourth comes unguided
    torch.testing.assert_close(dit_rule[:2, :3], guided[:, :3], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dit_rule[:2, 3], cond[:, 3], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dit_rule[2:, 3], uncond[:, 3], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(dit_rule[:2, 3], guided[:, 3])


def test_label_dropout_uses_null_class():
    model = create_model("DiT-S/4", input_size=16, num_classes=7)
    labels = torch.tensor([0, 3, 6, 2])
    dropped = model.y_embedder.token_drop(labels, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert dropped.tolist() == [7, 3, 7, 2]
    model.y_embedder.dropout_prob = 1.0
    assert (model.y_embedder.token_drop(labels) == 7).all()


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = randomise(tiny("vca", class_dropout_prob=0.0))
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([5.0, 50.0]), torch.tensor([1, 2])
    grads = []
    for use_checkpoint in (False, True):
        model.zero_grad()
        model.grad_checkpoint = use_checkpoint
        model(x, t, y).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_model_config_rebuilds_the_network_it_describes():
    """A checkpoint's model config alone rebuilds the network: same parameter names and shapes,
    VCA options included; the dict round trip is exact."""
    from models import ConfigError, ModelConfig, create_model

    options = {"contrast_grid": 1, "stage2_softmax": "joint", "dwc": False}
    config = ModelConfig("SiT-T/4", "vca", input_size=8, in_channels=3, num_classes=7, **options)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.learn_sigma is False and config.family == "SiT"  # SiT's default
    built = config.build().state_dict()
    direct = create_model("SiT-T/4", "vca", 8, 7, in_channels=3, **options).state_dict()
    assert {k: v.shape for k, v in built.items()} == {k: v.shape for k, v in direct.items()}
    assert not any("dwc" in key for key in built)
    assert ModelConfig("DiT-T/4", "mhsa", contrast_grid=3).vca_options() == {}
    bad = [
        ({"name": "DiT-Q/2"}, "unknown model"),
        ({"name": "DiT-T/4", "attention": "linear"}, "attention one of"),
        ({"name": "DiT-T/4", "input_size": 6}, "input_size a multiple of 4"),
        ({"name": "DiT-T/4", "contrast_grid": 0}, "contrast_grid positive"),
        ({"name": "DiT-T/4", "attention": "diff", "stage2_softmax": "joint"}, "diff ablation"),
    ]
    for fields, message in bad:
        with pytest.raises(ConfigError, match=message):
            ModelConfig(**fields)
