"""The training step that train.py runs and bench.train_step times, against a step written out by
hand (SiT's velocity loss, torch's per-parameter AdamW, the EMA formula), and the precision and
compile settings every script shares."""

import argparse
import copy

import pytest
import torch

from engine.ema import create_ema
from engine.objective import ObjectiveConfig, create_objective
from engine.precision import (
    add_precision_args,
    apply_precision,
    compile_blocks,
    resolve_compile,
    resolve_precision,
)
from engine.step import TrainStep, batch_latents, create_optimizer
from models import create_model
from models.codec import PixelCodec


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_sit(input_size=8):
    torch.manual_seed(0)
    model = create_model(
        "SiT-T/4", attention="vca", input_size=input_size, in_channels=4, num_classes=10
    )
    with torch.no_grad():  # no zero-initialised head: every parameter gets a gradient
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return model.train()


def by_hand(model, ema, latents, labels, decay, clip):
    """One step as DiT/SiT's train.py writes it, from the same RNG draws: t, then the noise."""
    objective = create_objective("SiT", ObjectiveConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False, fused=False)
    t0, t1 = objective.interval(objective.train_eps)
    t = torch.rand(latents.shape[0]) * (t1 - t0) + t0
    noise = torch.randn_like(latents)
    tt = t[:, None, None, None]
    xt, velocity = tt * latents + (1 - tt) * noise, latents - noise  # the Linear path
    loss = (model(xt, t, labels) - velocity).square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    if clip:
        for g in grads:
            g.mul_(min(1.0, clip / (norm.item() + 1e-6)))
    opt.step()
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.copy_(decay * e + (1 - decay) * p)
    return loss, norm


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_train_step_equals_the_step_written_by_hand(clip):
    model = tiny_sit()
    ema = create_ema(model)
    twin, twin_ema = copy.deepcopy(model), copy.deepcopy(ema)
    step = TrainStep(
        model,
        model,
        create_objective("SiT", ObjectiveConfig()),
        create_optimizer(model, lr=1e-3),  # fused: another kernel than the hand-written one
        ema,
        precision="fp32",
        ema_decay=0.9,
        grad_clip=clip,
    )
    latents, labels = torch.randn(4, 4, 8, 8), torch.tensor([0, 3, 7, 9])
    torch.manual_seed(5)
    loss, norm = step(latents, labels)
    torch.manual_seed(5)
    expected_loss, expected_norm = by_hand(twin, twin_ema, latents, labels, 0.9, clip)
    torch.testing.assert_close(loss, expected_loss.detach())
    torch.testing.assert_close(norm, expected_norm, rtol=1e-5, atol=0)
    assert clip == 0 or expected_norm > 10 * clip  # the small clip really clips
    for ours, theirs in ((model, twin), (ema, twin_ema)):
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, ema.blocks[0].attn.qkv.weight)


def test_reference_recipe_takes_no_gradient_norm_and_fp16_scales_the_loss():
    model = tiny_sit()
    common = dict(ema_decay=0.9999)
    objective = create_objective("SiT", ObjectiveConfig())
    dit = TrainStep(model, model, objective, create_optimizer(model, 1e-4, fused=False),
                    create_ema(model), precision="fp32", grad_clip=None, **common)  # fmt: skip
    assert dit(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]))[1] is None
    assert not dit.scaler.is_enabled()
    fp16 = TrainStep(model, model, objective, create_optimizer(model, 1e-4), create_ema(model),
                     precision="fp16", **common)  # fmt: skip
    assert fp16.scaler.is_enabled()


def test_batch_latents_from_the_cache_picks_the_flipped_posterior():
    """Row i takes posterior [i, flip_i] of (image, mirror); the flips and the sample noise are
    the global RNG's next draws, as the trainer's per-step seeding needs."""
    mean = torch.randn(5, 2, 4, 8, 8)
    std = torch.rand(5, 2, 4, 8, 8)
    labels = torch.arange(5)
    torch.manual_seed(11)
    latents, out_labels = batch_latents((mean, std, labels), None, torch.device("cpu"))
    torch.manual_seed(11)
    flip = torch.randint(2, (5,))
    eps = torch.randn(5, 4, 8, 8)
    assert 0 < flip.sum() < 5  # both branches are exercised by this seed
    for i in range(5):
        torch.testing.assert_close(latents[i], mean[i, flip[i]] + std[i, flip[i]] * eps[i])
    assert torch.equal(out_labels, labels)


def test_batch_latents_from_images_flips_and_encodes():
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    torch.manual_seed(2)
    latents, _ = batch_latents((images, torch.zeros(6)), PixelCodec(), torch.device("cpu"))
    torch.manual_seed(2)
    flip = torch.rand(6) < 0.5
    assert 0 < flip.sum() < 6
    for i in range(6):  # the pixel codec's posterior is the image itself, with zero spread
        torch.testing.assert_close(latents[i], images[i].flip(-1) if flip[i] else images[i])


def test_precision_and_compile_defaults():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("auto", gpu) == "bf16"
    assert resolve_precision("tf32", cpu) == "tf32"
    assert resolve_compile(None, cpu) is False and resolve_compile(None, gpu) is True
    assert resolve_compile(False, gpu) is False and resolve_compile(True, cpu) is True
    parser = argparse.ArgumentParser()
    add_precision_args(parser, "tf32", compile_default=False)
    args = parser.parse_args([])
    assert (args.precision, args.compile) == ("tf32", False)
    assert parser.parse_args(["--compile"]).compile is True
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        apply_precision("bf16")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        apply_precision("fp32")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("kernel", ["auto", "aten"])
def test_inductor_compiled_blocks_sample_with_guidance_in_parts_as_eager(
    monkeypatch, part_counts, kernel
):
    """Guided sampling doubles the batch the blocks see, and with it the number of parts the
    stream products run in; inductor-compiled blocks (the stream products as the opaque op,
    which `auto` picks without autograd as `aten` does) give eager mode's guided output in one
    part and in several, and run the op in those parts."""
    from models import attention

    monkeypatch.setattr(attention, "stream_kernel", kernel)
    model = tiny_sit(input_size=16).eval()  # 16 tokens, 2n = 32: maps worth splitting
    x, t, y = torch.randn(4, 4, 16, 16), torch.rand(4), torch.tensor([1, 2, 10, 10])
    counts = part_counts
    expected = {}
    with torch.no_grad():
        for minimum in (1 << 30, 1):
            monkeypatch.setitem(attention.MIN_PART_ENTRIES, "cpu", minimum)
            counts.clear()
            expected[minimum] = model.forward_with_cfg(x, t, y, cfg_scale=3.0)
            assert (max(counts) > 1) == (minimum == 1), counts
        assert expected[1].abs().mean() > 0.01
        torch._dynamo.reset()
        compile_blocks(model)
        for minimum, want in expected.items():
            monkeypatch.setitem(attention.MIN_PART_ENTRIES, "cpu", minimum)
            counts.clear()
            got = model.forward_with_cfg(x, t, y, cfg_scale=3.0)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert (max(counts) > 1) == (minimum == 1), counts


def test_compiled_blocks_share_one_graph_and_serve_guided_sampling():
    """compile_blocks compiles every VCA block of a 6-block model into one shared graph (traced
    by dynamo; the aot_eager backend skips inductor's code generation), and forward_with_cfg
    runs it with the eager numbers."""
    model = tiny_sit().eval()
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.tensor([1, 2, 10, 10])
    with torch.no_grad():
        expected = model.forward_with_cfg(x, t, y, cfg_scale=3.0)
        torch._dynamo.reset()
        compile_blocks(model, "aot_eager")
        counter = torch._dynamo.utils.counters
        counter.clear()
        got = model.forward_with_cfg(x, t, y, cfg_scale=3.0)
    assert len(model.blocks) == 6 and counter["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(got, expected)
