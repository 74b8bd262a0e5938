"""timm classifiers with the project's token mixers: each swap against a second code path (timm's
own model where the two must agree, a forward written out by hand for VCA), parameter counts
against a count from the formulas, and pretrained weights from a file."""

import json
import logging

import pytest
import timm
import torch

from models import __main__ as models_main
from models.attention import VisualContrastAttention
from models.classifier import create_classifier, load_timm_weights

SIZE = 64  # DeiT: a 4 x 4 patch grid; Swin: 16, 8, 4, 2; PVT-v2: 16, 8, 4, 2
DEIT, SWIN, PVT = "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "pvt_v2_b1"


def images(count=2, seed=0):
    return torch.randn(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def build(name, attention, **options):
    torch.manual_seed(0)
    return create_classifier(name, attention, img_size=SIZE, num_classes=10, **options).eval()


def test_deit_with_mhsa_is_timms_deit():
    native, swapped = build(DEIT, "native"), build(DEIT, "mhsa")
    report = load_timm_weights(swapped, native.state_dict())
    assert report.new == [] and report.unused == []
    with torch.no_grad():
        torch.testing.assert_close(swapped(images()), native(images()), rtol=1e-5, atol=1e-5)


def test_deit_with_vca_equals_a_forward_written_by_hand():
    """timm's DeiT pieces around standalone VCA modules (class token as a prefix token)."""
    swapped = build(DEIT, "vca", contrast_grid=2)
    with torch.no_grad():
        for p in swapped.parameters():  # no zero-initialised term can hide
            p.add_(torch.randn_like(p) * 0.05)
    native = build(DEIT, "native")
    load_timm_weights(native, swapped.state_dict())
    mixers = []
    for index, block in enumerate(swapped.blocks):
        mixer = VisualContrastAttention(192, 3, (4, 4), layer_index=index, contrast_grid=2,
                                        prefix_tokens=1)  # fmt: skip
        mixer.load_state_dict(block.attn.mixer.state_dict())
        mixers.append(mixer)
    with torch.no_grad():
        x = native._pos_embed(native.patch_embed(images()))
        for block, mixer in zip(native.blocks, mixers, strict=True):
            x = x + mixer(block.norm1(x))
            x = x + block.mlp(block.norm2(x))
        expected = native.head(native.norm(x)[:, 0])
        torch.testing.assert_close(swapped(images()), expected, rtol=1e-5, atol=1e-5)


def test_swin_with_mhsa_is_timms_swin_with_one_window_per_stage_and_no_position_bias():
    native, swapped = build(SWIN, "native"), build(SWIN, "mhsa")
    tables = []
    for stage_index, stage in enumerate(native.layers):
        for block_index, block in enumerate(stage.blocks):
            block.set_input_size(block.input_resolution, block.input_resolution)
            block.attn.relative_position_bias_table.data.zero_()
            tables.append(
                f"layers.{stage_index}.blocks.{block_index}.attn.relative_position_bias_table"
            )
    report = load_timm_weights(swapped, native.state_dict())
    assert report.new == [] and sorted(report.unused) == sorted(tables)
    with torch.no_grad():
        torch.testing.assert_close(swapped(images()), native(images()), rtol=1e-5, atol=1e-5)


def test_pvt_with_mhsa_is_timms_pvt_without_spatial_reduction():
    torch.manual_seed(0)
    native = timm.create_model(PVT, num_classes=10, sr_ratios=(1, 1, 1, 1)).eval()
    swapped = build(PVT, "mhsa")
    state = native.state_dict()
    for key in [k for k in state if k.endswith(".attn.q.weight") or k.endswith(".attn.q.bias")]:
        kind = key.rsplit(".", 1)[1]
        prefix = key[: -len(f"q.{kind}")]
        state[f"{prefix}mixer.qkv.{kind}"] = torch.cat([state[key], state[f"{prefix}kv.{kind}"]])
    report = load_timm_weights(swapped, state)
    assert report.new == [] and all(".attn.q." in k or ".attn.kv." in k for k in report.unused)
    with torch.no_grad():
        torch.testing.assert_close(swapped(images()), native(images()), rtol=1e-5, atol=1e-5)


def vca_parameters(dim, heads, grid, contrast_grid):
    """One VCA mixer counted from its formulas: qkv and proj, two sets of n contrast tokens, two
    lambdas of four head_dim vectors, two RMSNorms of head_dim, a 3x3 depthwise conv."""
    n = min(contrast_grid, grid[0]) * min(contrast_grid, grid[1])
    head_dim = dim // heads
    return 4 * dim * dim + 4 * dim + 2 * n * dim + 8 * head_dim + 2 * head_dim + 10 * dim


@pytest.mark.parametrize(
    "name,blocks",
    [
        (DEIT, [(192, 3, (4, 4))] * 12),
        (SWIN, [(96, 3, (16, 16))] * 2 + [(192, 6, (8, 8))] * 2 + [(384, 12, (4, 4))] * 6
         + [(768, 24, (2, 2))] * 2),
        (PVT, [(64, 1, (16, 16))] * 2 + [(128, 2, (8, 8))] * 2 + [(320, 5, (4, 4))] * 2
         + [(512, 8, (2, 2))] * 2),
    ],
)  # fmt: skip
def test_parameter_counts_follow_the_formulas(name, blocks):
    native, swapped = build(name, "native"), build(name, "vca", contrast_grid=3)
    own = sum(p.numel() for p in native.parameters())
    native_attention = sum(p.numel() for n, p in native.named_parameters() if ".attn." in n)
    expected = own - native_attention + sum(vca_parameters(*b, 3) for b in blocks)
    assert sum(p.numel() for p in swapped.parameters()) == expected


def test_pretrained_file_fills_everything_but_the_new_attention_parameters(tmp_path, caplog):
    source = build(DEIT, "native")
    path = tmp_path / "deit.pth"
    torch.save(source.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="models.classifier"):
        model = build(DEIT, "vca", contrast_grid=2, pretrained=str(path))
    own = model.state_dict()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(own[key.replace(".attn.", ".attn.mixer.")], value)
    extras = {"contrast_pos", "contrast_neg", "lambda1.q1", "lambda1.k1", "lambda1.q2",
              "lambda1.k2", "lambda2.q1", "lambda2.k1", "lambda2.q2", "lambda2.k2",
              "norm1.weight", "norm2.weight", "dwc.weight", "dwc.bias"}  # fmt: skip
    expected_new = {f"blocks.{i}.attn.mixer.{extra}" for i in range(12) for extra in extras}
    assert set(load_timm_weights(model, source.state_dict()).new) == expected_new
    assert "blocks.0.attn.mixer.contrast_pos" in caplog.text and "unused: []" in caplog.text


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="unsupported timm model"):
        create_classifier("resnet50", "vca")
    with pytest.raises(ValueError, match="unknown attention"):
        create_classifier(DEIT, "linear")
    pvt = build(PVT, "vca")
    with pytest.raises(ValueError, match="grid"):
        pvt(torch.randn(1, 3, 96, 96))


def test_classification_table_counts_deit_tiny_by_the_closed_forms(tmp_path):
    """`python -m models --table --classification`: DeiT-T at 224 px against ViT's MAC formula
    (197 tokens of width 192: 12 N C^2 + 2 N^2 C per block, the patch projection and the head)
    and VCA's parameters against the formulas with a 7 x 7 contrast grid."""
    path = tmp_path / "table.json"
    models_main.main(["--table", "--classification", "--json", str(path)])
    rows = {(r["model"], r["attention"]): r for r in json.loads(path.read_text())}
    assert len(rows) == 4 * 3
    n, c = 197, 192
    macs = 12 * (12 * n * c * c + 2 * n * n * c) + 196 * 768 * c + c * 1000
    assert rows[DEIT, "native"]["gmacs"] == pytest.approx(macs / 1e9, rel=1e-3)
    native = rows[DEIT, "native"]["params"]
    attention = 12 * (4 * c * c + 4 * c)
    assert rows[DEIT, "vca"]["params"] == native - attention + 12 * vca_parameters(
        c, 3, (14, 14), 7
    )
