"""Token mixers against straightforward float64 re-implementations written here: explicit
matmuls and softmaxes, pooling by block means, a depthwise conv by shifted sums."""

import math
import os

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.utils.flop_counter import FlopCounterMode

from models import attention
from models.attention import (
    ATTENTIONS,
    DifferentialAttention,
    InlineCustomOps,
    VisualContrastAttention,
    build_attention,
    lambda_init_for,
    stream_difference_op,
)

B, H, W, C, HEADS = 2, 8, 8, 48, 4
D = C // HEADS


def softmax(s):
    e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def attend(q, k, v):
    """softmax(q k^T / sqrt(dim)) v over the last two dims."""
    return softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])) @ v


def rms(x, weight):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * weight


def lam(module):
    """lambda as a float64 tensor that gradients flow through."""
    a = torch.dot(module.q1.double(), module.k1.double())
    b = torch.dot(module.q2.double(), module.k2.double())
    return torch.exp(a) - torch.exp(b) + module.lambda_init


def heads(t, num_heads):
    """(B, n, C) -> (B, M, n, C/M)."""
    return t.reshape(t.shape[0], t.shape[1], num_heads, -1).transpose(1, 2)


def merge(t):
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def split_qkv(mod, x):
    qkv = x @ mod.qkv.weight.double().T + mod.qkv.bias.double()
    return qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]


def block_mean_pool(t, grid, out):
    """(B, N, C) on a grid -> (B, n, C) means over equal blocks (grid divisible by out)."""
    (gh, gw), (oh, ow) = grid, out
    blocks = t.reshape(t.shape[0], oh, gh // oh, ow, gw // ow, t.shape[-1])
    return blocks.mean(dim=(2, 4)).reshape(t.shape[0], oh * ow, t.shape[-1])


def depthwise3x3(v, conv, grid):
    gh, gw = grid
    img = v.reshape(v.shape[0], gh, gw, -1)
    padded = torch.nn.functional.pad(img, (0, 0, 1, 1, 1, 1))
    weight = conv.weight.double()[:, 0]  # (C, 3, 3)
    out = torch.zeros_like(img) + conv.bias.double()
    for dy in range(3):
        for dx in range(3):
            out = out + padded[:, dy : dy + gh, dx : dx + gw, :] * weight[:, dy, dx]
    return out.reshape(v.shape)


def reference_vca(mod, x, layer, prefix=0):
    """VCA written out in float64; the first `prefix` tokens stay off the grid (no pooling, no
    conv) and take part in both stages as keys, values and queries."""
    x = x.double()
    q, k, v = split_qkv(mod, x)
    li = 0.8 - 0.6 * math.exp(-0.3 * layer)
    variant = mod.variant
    n_grid = mod.contrast_grid
    if variant in ("emb", "diff"):
        content = x.new_zeros(x.shape[0], n_grid[0] * n_grid[1], C)
    else:
        content = block_mean_pool(q[:, prefix:], (H, W), n_grid)
    pos = heads(content + mod.contrast_pos.double(), HEADS)
    qh, kh, vh = heads(q, HEADS), heads(k, HEADS), heads(v, HEADS)
    if variant == "diff":
        h = D // 2
        t1, t2 = pos[..., :h], pos[..., h:]
        v_hat = attend(t1, kh[..., :h], vh) - lam(mod.lambda1) * attend(t2, kh[..., h:], vh)
        v_hat = (1 - li) * rms(v_hat, mod.norm1.weight.double())
        out = attend(qh[..., :h], t1, v_hat) - lam(mod.lambda2) * attend(qh[..., h:], t2, v_hat)
        out = (1 - li) * rms(out, mod.norm2.weight.double())
    else:
        neg = heads(content + mod.contrast_neg.double(), HEADS)
        if variant in ("vca", "stage1", "emb"):
            v_hat = attend(pos, kh, vh) - lam(mod.lambda1) * attend(neg, kh, vh)
            v_hat = (1 - li) * rms(v_hat, mod.norm1.weight.double())
        else:
            v_hat = attend(pos, kh, vh)
        if variant == "stage1":
            out = attend(qh, pos, v_hat)
        elif mod.stage2_softmax == "joint":
            scale = 1 / math.sqrt(D)
            a = softmax(
                torch.cat([qh @ pos.transpose(-1, -2), qh @ neg.transpose(-1, -2)], -1) * scale
            )
            n = pos.shape[2]
            out = (a[..., :n] - lam(mod.lambda2) * a[..., n:]) @ v_hat
            out = (1 - li) * rms(out, mod.norm2.weight.double())
        else:
            a_pos = softmax(qh @ pos.transpose(-1, -2) / math.sqrt(D))
            a_neg = softmax(qh @ neg.transpose(-1, -2) / math.sqrt(D))
            out = (a_pos - lam(mod.lambda2) * a_neg) @ v_hat
            out = (1 - li) * rms(out, mod.norm2.weight.double())
    out = merge(out)
    if mod.dwc is not None:
        conv = depthwise3x3(v[:, prefix:], mod.dwc, (H, W))
        out = out + torch.cat([torch.zeros_like(out[:, :prefix]), conv], 1)
    return out @ mod.proj.weight.double().T + mod.proj.bias.double()


def randomise(module, generator):
    """Non-trivial values everywhere (RMSNorm weights and conv too), so no term can hide."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


VARIANTS = [
    ("vca", "separate", True),
    ("vca", "joint", True),
    ("vca", "separate", False),
    ("vca", "joint", False),
    ("stage1", "separate", True),
    ("stage2", "separate", True),
    ("stage2", "joint", False),
    ("emb", "separate", True),
    ("emb", "joint", True),
    ("diff", "separate", True),
]


@pytest.mark.parametrize("products", ["whole", "parts", "traced", "triton"])
@pytest.mark.parametrize("variant,softmax_mode,dwc", VARIANTS)
def test_vca_matches_reference(request, monkeypatch, variant, softmax_mode, dwc, products):
    """Output and every gradient (input and parameters, through the hand-written backward of
    the stacked-stream products and of the norms) equal autograd through the reference, in
    float64; so does the output without autograd (norms in place). `parts`: the products run
    in as many parts as MAP_SHARE asks, as they do for large maps; `traced`: as plain autograd
    ops, as torch.compile traces them; `triton`: in the Triton kernels (interpreted on the
    CPU), as set_stream_kernel("triton") runs them on GPUs."""
    if products == "parts":
        monkeypatch.setitem(attention.MIN_PART_ENTRIES, "cpu", 1)
    if products == "traced":
        monkeypatch.setattr(attention, "stream_kernel", "traced")
    device = "cpu"
    if products == "triton":
        request.getfixturevalue("triton_stream_kernels")
        from models import triton_streams

        device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
        launches = []
        forward = triton_streams.forward
        monkeypatch.setattr(triton_streams, "forward", lambda *a: launches.append(forward(*a)))
    g = torch.Generator().manual_seed(0)
    layer = 3
    mod = VisualContrastAttention(
        C,
        HEADS,
        (H, W),
        layer_index=layer,
        variant=variant,
        contrast_grid=4,
        stage2_softmax=softmax_mode,
        dwc=dwc,
    ).double()
    randomise(mod, g)
    mod.to(device)
    x = torch.randn(B, H * W, C, generator=g, dtype=torch.float64).to(device).requires_grad_()
    cotangent = torch.randn(B, H * W, C, generator=g, dtype=torch.float64).to(device)
    params = [x, *mod.parameters()]
    out = mod(x)
    grads = torch.autograd.grad((out * cotangent).sum(), params)
    expected = reference_vca(mod, x, layer)
    expected_grads = torch.autograd.grad((expected * cotangent).sum(), params)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), expected, rtol=1e-10, atol=1e-10)
    names = ["x", *(name for name, _ in mod.named_parameters())]
    for name, got, want in zip(names, grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)
    assert products != "triton" or launches, "the Triton kernels did not run"


@pytest.mark.parametrize("prefix,softmax_mode", [(1, "separate"), (2, "joint")])
def test_vca_with_prefix_tokens_matches_reference(prefix, softmax_mode):
    """A ViT's class (and distillation) tokens: off the grid, in both stages."""
    g = torch.Generator().manual_seed(1)
    mod = VisualContrastAttention(
        C,
        HEADS,
        (H, W),
        layer_index=2,
        contrast_grid=4,
        stage2_softmax=softmax_mode,
        prefix_tokens=prefix,
    ).double()
    randomise(mod, g)
    x = torch.randn(B, prefix + H * W, C, generator=g, dtype=torch.float64, requires_grad=True)
    out = mod(x)
    expected = reference_vca(mod, x, 2, prefix=prefix)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad, expected_grad = (torch.autograd.grad(y.sum(), x)[0] for y in (out, expected))
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "grid,size", [((8, 8), (4, 4)), ((6, 10), (3, 5)), ((16, 16), (8, 8)), ((7, 9), (3, 4))]
)
def test_average_pool_equals_adaptive_pooling_with_its_gradient(grid, size):
    """Block means where the contrast grid divides the token grid (on VCA's strided grid view,
    as _grid passes it), adaptive pooling where it does not: F.adaptive_avg_pool2d's output and
    gradient either way."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, grid[0] * grid[1], 6, generator=g, dtype=torch.float64)
    view = tokens.transpose(1, 2).unflatten(-1, grid).requires_grad_()  # (B, C, H, W) view
    cotangent = torch.randn(2, 6, *size, generator=g, dtype=torch.float64)
    got = attention.average_pool(view, size)
    (got_grad,) = torch.autograd.grad((got * cotangent).sum(), view)
    expected = torch.nn.functional.adaptive_avg_pool2d(view, size)
    (expected_grad,) = torch.autograd.grad((expected * cotangent).sum(), view)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-14, atol=1e-14)


def test_vca_rectangular_contrast_grid_and_float32():
    g = torch.Generator().manual_seed(1)
    mod = VisualContrastAttention(C, HEADS, (H, W), layer_index=0, contrast_grid=(2, 4))
    randomise(mod, g)
    x = torch.randn(B, H * W, C, generator=g)
    assert mod.contrast_pos.shape == (8, C)
    torch.testing.assert_close(
        mod(x).double(), reference_vca(mod.double(), x, 0), rtol=1e-4, atol=1e-4
    )


def test_differential_attention_matches_reference():
    g = torch.Generator().manual_seed(2)
    layer = 5
    mod = DifferentialAttention(C, HEADS, layer_index=layer).double()
    randomise(mod, g)
    x = torch.randn(B, H * W, C, generator=g, dtype=torch.float64)
    q, k, v = split_qkv(mod, x)
    pairs = HEADS // 2
    qh, kh, vh = heads(q, pairs), heads(k, pairs), heads(v, pairs)
    assert vh.shape[-1] == 2 * D
    a1 = softmax(qh[..., :D] @ kh[..., :D].transpose(-1, -2) / math.sqrt(D))
    a2 = softmax(qh[..., D:] @ kh[..., D:].transpose(-1, -2) / math.sqrt(D))
    li = 0.8 - 0.6 * math.exp(-0.3 * layer)
    out = (1 - li) * rms((a1 - lam(mod.lam) * a2) @ vh, mod.norm.weight.double())
    expected = merge(out) @ mod.proj.weight.double().T + mod.proj.bias.double()
    torch.testing.assert_close(mod(x), expected, rtol=1e-9, atol=1e-9)


def test_mhsa_matches_reference():
    g = torch.Generator().manual_seed(3)
    mod = build_attention("mhsa", C, HEADS, (H, W), 0).double()
    randomise(mod, g)
    x = torch.randn(B, H * W, C, generator=g, dtype=torch.float64)
    q, k, v = split_qkv(mod, x)
    out = merge(attend(heads(q, HEADS), heads(k, HEADS), heads(v, HEADS)))
    expected = out @ mod.proj.weight.double().T + mod.proj.bias.double()
    torch.testing.assert_close(mod(x), expected, rtol=1e-9, atol=1e-9)


def test_lambda_init_schedule_and_lambda_value():
    for layer in range(8):
        assert lambda_init_for(layer) == pytest.approx(
            0.8 - 0.6 * math.exp(-0.3 * layer), abs=1e-15
        )
    assert lambda_init_for(0) == pytest.approx(0.2)
    torch.manual_seed(0)
    mod = VisualContrastAttention(C, HEADS, (H, W), layer_index=4)
    assert mod.lambda1.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-1.2))
    expected = lam(mod.lambda1).item()
    value, init = mod.lambda1()
    assert value.dtype == init.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert init.item() == pytest.approx(mod.lambda_init, rel=1e-6)
    # lambda vectors start near N(0, 0.1): the product term is small, lambda is near lambda_init
    assert all(abs(p.std().item() - 0.1) < 0.06 for p in mod.lambda1.parameters())


@pytest.mark.parametrize("kind", [a for a in ATTENTIONS if a != "mhsa"])
def test_gradients_reach_every_parameter(kind):
    torch.manual_seed(0)
    mod = build_attention(
        kind, C, HEADS, (H, W), 2, **({} if kind == "diffattn" else {"contrast_grid": 4})
    )
    x = torch.randn(B, H * W, C)
    mod(x).square().sum().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    names = set(dict(mod.named_parameters()))
    expected = {
        "vca": {
            "contrast_pos",
            "contrast_neg",
            "lambda1.q1",
            "lambda2.k2",
            "norm1.weight",
            "norm2.weight",
            "dwc.weight",
        },
        "stage1": {"contrast_neg", "lambda1.q1", "norm1.weight"},
        "stage2": {"contrast_neg", "lambda2.q1", "norm2.weight"},
        "emb": {"contrast_pos", "contrast_neg", "lambda1.q2", "lambda2.q2"},
        "diff": {"contrast_pos", "lambda1.k1", "lambda2.k1", "norm2.weight"},
        "diffattn": {"lam.q1", "lam.k2", "norm.weight"},
    }[kind]
    assert expected <= names


def test_vca_cost_is_linear_in_tokens():
    """Attention FLOPs grow ~linearly in N for VCA (fixed n) but quadratically for MHSA."""

    def attention_flops(kind, side):
        with torch.device("meta"):
            mod = build_attention(kind, 384, 6, (side, side), 0)
            x = torch.empty(1, side * side, 384)
        counter = FlopCounterMode(display=False)
        with counter, InlineCustomOps():
            mod(x)
        linear = 2 * side * side * 384 * 384 * 4  # qkv + proj, identical for both
        return counter.get_total_flops() - linear

    vca_ratio = attention_flops("vca", 64) / attention_flops("vca", 32)
    mhsa_ratio = attention_flops("mhsa", 64) / attention_flops("mhsa", 32)
    assert 3.5 < vca_ratio < 4.5  # N x4
    assert 15.5 < mhsa_ratio < 16.5  # N^2 x16


def test_bad_options_raise():
    with pytest.raises(ValueError, match="stage2_softmax"):
        VisualContrastAttention(C, HEADS, (H, W), stage2_softmax="both")
    with pytest.raises(ValueError, match="unknown attention"):
        build_attention("linear", C, HEADS, (H, W), 0)
    with pytest.raises(ValueError, match="even number of heads"):
        DifferentialAttention(C, 3)


@pytest.mark.parametrize("kernel", ["auto", "aten"])
def test_compiled_vca_equals_eager_and_saves_no_map_for_the_backward(monkeypatch, kernel):
    """Under torch.compile (AOT autograd with inductor's partitioner) VCA's output and every
    gradient equal eager mode's on a non-square grid. The 3x3 depthwise conv is a custom op:
    the graph holds no aten convolution, which would make inductor store every attention
    tensor channels-last. By default (`auto`) the stream differences are traced, softmaxes
    and all, and the forward saves no (N x 2n) map for the backward, which recomputes them;
    with the `aten` kernel they are one opaque op each, which forms its maps inside."""
    from functorch.compile import min_cut_rematerialization_partition

    monkeypatch.setattr(attention, "stream_kernel", kernel)
    torch.manual_seed(0)
    layer = build_attention("vca", 32, 4, (6, 10), 2, contrast_grid=(3, 5)).double()
    randomise(layer, torch.Generator().manual_seed(0))
    x = torch.randn(2, 60, 32, dtype=torch.float64, requires_grad=True)
    cotangent = torch.randn(2, 60, 32, dtype=torch.float64)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    backend = aot_autograd(
        fw_compiler=record, bw_compiler=record, partition_fn=min_cut_rematerialization_partition
    )
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    params = [x, *layer.parameters()]
    results = []
    for run in (layer, compiled):
        out = run(x)
        results.append([out, *torch.autograd.grad((out * cotangent).sum(), params)])
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    ops = {str(node.target) for gm in graphs for node in gm.graph.nodes}
    assert len(graphs) == 2 and not any("aten.convolution" in op for op in ops), ops
    assert {
        "vca_dit.depthwise_conv3x3.default",
        "vca_dit.depthwise_conv3x3_backward.default",
    } <= ops
    stream_ops = {"vca_dit.stream_difference.default", "vca_dit.stream_difference_backward.default"}
    if kernel == "aten":
        assert stream_ops <= ops and not any("softmax" in op for op in ops), ops
    else:
        assert not stream_ops & ops and any("softmax" in op for op in ops), ops
    saved = [node.meta["val"] for node in graphs[0].graph.find_nodes(op="output")[0].args[0]]
    map_entries = 2 * 4 * 60 * 30  # batch x heads x N x 2n
    assert max(t.numel() for t in saved if isinstance(t, torch.Tensor)) < map_entries


COMPILED_CASES = [(*case, "auto") for case in VARIANTS if case[2]] + [
    ("vca", "separate", True, "aten"),
    ("vca", "joint", True, "aten"),
    ("stage1", "separate", True, "aten"),
    ("stage2", "separate", True, "aten"),
    ("emb", "separate", True, "aten"),
    ("diff", "separate", True, "aten"),
]


@pytest.mark.parametrize("variant,softmax_mode,dwc,kernel", COMPILED_CASES)
def test_inductor_compiled_vca_equals_eager_in_one_two_and_four_parts(
    monkeypatch, part_counts, variant, softmax_mode, dwc, kernel
):
    """Each variant's layer compiled by inductor, forward and backward, equals eager mode
    while the eager products run in 1, 2 and 4 parts (the part minimum lowered as larger
    batches cross it). With the `aten` kernel the compiled layer runs the op in the same
    parts, and its backward's outputs must keep the strides its fake kernel promises (a
    gradient laid out as the strided head view it belongs to failed inductor's stride
    assertions); by default (`auto`) the compiled layer traces the products, in one piece."""
    generator = torch.Generator().manual_seed(0)
    layer = build_attention(
        variant, 32, 4, (4, 6), 3, contrast_grid=(2, 2), stage2_softmax=softmax_mode, dwc=dwc
    ).double()
    randomise(layer, generator)
    x = torch.randn(3, 24, 32, generator=generator, dtype=torch.float64, requires_grad=True)
    cotangent = torch.randn(3, 24, 32, generator=generator, dtype=torch.float64)
    params = [x, *layer.parameters()]
    counts = part_counts
    monkeypatch.setattr(attention, "stream_kernel", kernel)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    map_entries = 3 * 4 * 24 * 8  # batch x heads x N x 2n, in either stage
    for minimum, parts in [(map_entries, 1), (map_entries // 2, 2), (1, 4)]:
        monkeypatch.setitem(attention.MIN_PART_ENTRIES, "cpu", minimum)
        results = []
        for run in (layer, compiled):
            counts.clear()
            out = run(x)
            results.append([out, *torch.autograd.grad((out * cotangent).sum(), params)])
            ran = set(counts)
            assert ran == {parts} if run is layer or kernel == "aten" else not ran, (minimum, ran)
        names = ["out", "x", *(name for name, _ in layer.named_parameters())]
        for name, got, expected in zip(names, results[1], results[0], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=(parts, name))


@pytest.mark.parametrize("kernel", ["auto", "aten"])
def test_inductor_compiled_vca_under_bf16_autocast_in_parts_stays_close_to_eager(
    monkeypatch, kernel
):
    """train.py's compiled step in miniature: bf16 autocast, the maps in several parts."""
    monkeypatch.setitem(attention.MIN_PART_ENTRIES, "cpu", 1)
    monkeypatch.setattr(attention, "stream_kernel", kernel)
    generator = torch.Generator().manual_seed(1)
    layer = build_attention("vca", 48, 4, (8, 8), 1, contrast_grid=4)
    x = torch.randn(4, 64, 48, generator=generator, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    results = []
    for run in (layer, compiled):
        with torch.autocast("cpu", torch.bfloat16):
            out = run(x).float()
        results.append([out, *torch.autograd.grad(out.square().mean(), [x, *layer.parameters()])])
    for got, expected in zip(results[1], results[0], strict=True):
        scale = expected.abs().max().clamp_min(1e-6)
        assert (got - expected).abs().max() <= 0.03 * scale


@pytest.mark.parametrize("parts", ["one", "several"])
@pytest.mark.parametrize(
    "in_keys, joint", [(False, False), (True, False), (True, True)], ids=["I", "II", "II-joint"]
)
def test_stream_difference_ops_pass_torch_library_opcheck(monkeypatch, in_keys, joint, parts):
    """Schema, fake (meta) kernel, autograd registration and AOT dispatch of the custom op and
    of its backward op agree with their eager behaviour, strides included, on strided head
    views like the ones the qkv projection gives, in one part and in several."""
    if parts == "several":
        monkeypatch.setitem(attention.MIN_PART_ENTRIES, "cpu", 1)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 12, 3, 4, 8, generator=g).permute(2, 0, 3, 1, 4)  # (3, B, M, N, d)
    tokens = torch.randn(2, 4, 6, 8, generator=g)
    if in_keys:
        args = (qkv[0], tokens, torch.randn(2, 4, 3, 8, generator=g))
    else:
        args = (tokens, qkv[1], qkv[2])
    args = [t.requires_grad_() for t in (*args, torch.tensor(0.4))]
    count = len(list(attention.product_parts(*args[:2], in_keys)))
    assert count == 1 if parts == "one" else count > 1
    torch.library.opcheck(stream_difference_op, (*args, in_keys, joint))
    grad = torch.randn(stream_difference_op(*args, in_keys, joint).shape, generator=g)
    backward_args = (grad, *(t.detach() for t in args), in_keys, joint)
    torch.library.opcheck(attention.stream_difference_backward, backward_args)


@pytest.mark.parametrize("grid", [(2, 8, 3, 5), (1, 4, 1, 6), (3, 2, 4, 4)])
def test_depthwise_conv_ops_pass_torch_library_opcheck(grid):
    """The depthwise conv op and its backward op keep their fake kernels' shapes and strides,
    on the strided grid view VCA passes them, with one-row grids among them."""
    g = torch.Generator().manual_seed(0)
    B_, C_, H_, W_ = grid
    tokens = torch.randn(B_, H_ * W_, C_, generator=g)
    view = tokens.transpose(1, 2).unflatten(-1, (H_, W_))  # (B, C, H, W), channels-last
    weight, bias = torch.randn(C_, 1, 3, 3, generator=g), torch.randn(C_, generator=g)
    args = [t.requires_grad_() for t in (view.detach(), weight, bias)]
    torch.library.opcheck(attention.depthwise_conv3x3, args)
    grad = torch.randn(B_, H_ * W_, C_, generator=g)
    backward_args = (grad, view, weight.detach())
    torch.library.opcheck(attention.depthwise_conv3x3_backward, backward_args)


def test_inline_custom_ops_lets_a_dispatch_mode_see_inside_the_stream_difference():
    """Counted as one op, the stream difference would show only its output; inlined, the live
    bytes include the (N x 2n) maps it forms, and the FLOPs its two products."""
    from bench.attention import LiveTensorBytes

    N, n, d = 512, 32, 16
    q, v = torch.randn(1, 1, N, d), torch.randn(1, 1, n, d)
    tokens, lam = torch.randn(1, 1, 2 * n, d), torch.tensor(0.5)
    with LiveTensorBytes() as opaque:
        stream_difference_op(q, tokens, v, lam, True, False)
    with LiveTensorBytes() as inlined, InlineCustomOps():
        stream_difference_op(q, tokens, v, lam, True, False)
    with FlopCounterMode(display=False) as flops, InlineCustomOps():
        stream_difference_op(q, tokens, v, lam, True, False)
    assert opaque.peak == N * d * 4
    maps, output = N * 2 * n * 4, N * d * 4
    assert inlined.peak >= maps + output
    assert flops.get_total_flops() == 2 * (N * 2 * n * d + N * n * d)


@pytest.mark.parametrize("kind", ["mhsa", "vca", "diffattn"])
def test_blocks_of_every_depth_share_one_compiled_graph(kind):
    """lambda_init comes from an integer buffer, not a per-block Python float, so compiling one
    layer's forward serves the layers of every depth without recompiling or breaking the
    graph, as for plain attention."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    run = torch.compile(lambda layer, x: layer(x), backend=counting_backend, fullgraph=True)
    x = torch.randn(1, 16, 32)
    for depth in (0, 1, 5, 11):
        run(
            build_attention(
                kind, 32, 4, (4, 4), depth, **({} if kind != "vca" else {"contrast_grid": 2})
            ),
            x,
        )
    assert len(graphs) == 1


def test_vca_mixing_costs_three_quarters_of_attention_at_a_quarter_of_the_tokens():
    """Both streams share one product per stage and the maps are differenced before the values
    are multiplied: 6 n N d multiply-adds per head in the forward, against plain attention's
    2 N^2 d; with n = N / 4 (the default 8 x 8 contrast grid on DiT-S/2's 16 x 16) that is
    0.75x. Counted on the meta device, the depthwise conv left out."""
    side, n_side, dim, heads = 16, 8, 384, 6
    N, n, d = side * side, n_side * n_side, dim // heads

    def mixing_flops(kind, **opts):
        with torch.device("meta"):
            layer = build_attention(kind, dim, heads, (side, side), 3, **opts)
            q, k, v = (torch.empty(2, heads, N, d) for _ in range(3))
        counter = FlopCounterMode(display=False)
        with counter, InlineCustomOps():
            layer.mix(q, k, v)
        return counter.get_total_flops()

    vca = mixing_flops("vca", contrast_grid=n_side, dwc=False)
    mhsa = mixing_flops("mhsa")
    assert vca == 2 * 2 * heads * 6 * n * N * d  # batch 2, 2 FLOPs per multiply-add
    assert mhsa == 2 * 2 * heads * 2 * N * N * d
    assert vca / mhsa == 0.75


@pytest.mark.parametrize("softmax_mode", ["separate", "joint"])
def test_vca_under_bf16_autocast_stays_close_to_float64(softmax_mode):
    """Under bf16 autocast (the training default on GPUs) the maps are bf16 and lambda and the
    norm statistics fp32: output and input gradient stay within 1.5% of float64 (bf16 keeps 8
    bits; MHSA's flash kernel lands at about 0.35% here, VCA at about 0.6% and 0.9%)."""
    torch.manual_seed(0)
    layer = build_attention("vca", 96, 4, (8, 8), 2, contrast_grid=4, stage2_softmax=softmax_mode)
    x = torch.randn(2, 64, 96, requires_grad=True)
    expected = layer.double()(x.double())
    expected_grad = torch.autograd.grad(expected.square().sum(), x)[0]
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    grad = torch.autograd.grad(out.float().square().sum(), x)[0]
    assert out.dtype == torch.bfloat16
    assert (out.double() - expected).norm() < 0.015 * expected.norm()
    assert (grad.double() - expected_grad).norm() < 0.015 * expected_grad.norm()


@pytest.mark.parametrize("in_keys, joint", [(False, False), (True, False), (True, True)])
def test_stream_difference_in_parts_equals_one_product(monkeypatch, in_keys, joint):
    """The parts large maps are formed in (query rows in Stage II, heads in Stage I) give the
    one-product output and gradients, and hold fewer bytes at their peak."""
    from bench.attention import LiveTensorBytes

    g = torch.Generator().manual_seed(0)
    B_, M_, N_, n_ = 2, 3, 64, 16  # maps (2n per row) outweigh the N-token tensors (d per row)
    rows = N_ if in_keys else 2 * n_
    cols = 2 * n_ if in_keys else N_
    query = torch.randn(B_, M_, rows, D, generator=g, dtype=torch.float64, requires_grad=True)
    key = torch.randn(B_, M_, cols, D, generator=g, dtype=torch.float64, requires_grad=True)
    value = torch.randn(
        B_, M_, n_ if in_keys else N_, D, generator=g, dtype=torch.float64, requires_grad=True
    )
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    inputs = (query, key, value, lam)
    cotangent = torch.randn(B_, M_, N_ if in_keys else n_, D, generator=g, dtype=torch.float64)

    def run():
        with torch.no_grad(), LiveTensorBytes() as counter, InlineCustomOps():
            stream_difference_op(*inputs, in_keys, joint)
        out = stream_difference_op(*inputs, in_keys, joint)
        return counter.peak, [out, *torch.autograd.grad((out * cotangent).sum(), inputs)]

    assert len(list(attention.product_parts(query, key, in_keys))) == 1
    whole_peak, whole = run()
    monkeypatch.setitem(attention.MIN_PART_ENTRIES, "cpu", 1)
    parts = len(list(attention.product_parts(query, key, in_keys)))
    assert parts == M_ if not in_keys else parts > M_  # rows: maps of 2n = 32 against d = 12
    parts_peak, in_parts = run()
    for got, expected in zip(in_parts, whole, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert parts_peak < whole_peak


def test_product_parts_split_only_large_maps_with_a_device_dependent_floor():
    """DiT-S/2's Stage II at 256 tokens: at batch 1 the maps (196K entries) stay whole on the
    CPU; at batch 16 (3.1M) they run in 6 parts of 512K; on other devices, where the floor is
    16M entries, in one. Every query row is in exactly one part."""
    tokens = torch.empty(1, 6, 128, 64)
    assert len(list(attention.product_parts(torch.empty(1, 6, 256, 64), tokens, True))) == 1
    query = torch.empty(16, 6, 256, 64)
    parts = list(attention.product_parts(query, tokens.expand(16, -1, -1, -1), True))
    rows = torch.cat([torch.arange(256)[part[-2]] for part, _ in parts])
    assert len(parts) == 6 and torch.equal(rows, torch.arange(256))
    meta = (query.to("meta"), tokens.to("meta").expand(16, -1, -1, -1))
    assert len(list(attention.product_parts(*meta, True))) == 1


@pytest.mark.parametrize("in_keys", [False, True], ids=["I", "II"])
def test_stream_difference_without_a_head_axis_and_with_no_rows(in_keys):
    """2-D inputs (one head, no batch) give the stage's formula; a product with no query rows
    gives an empty output and zero gradients for the stream tokens."""
    g = torch.Generator().manual_seed(0)
    n_, N_ = 4, 10
    big = torch.randn(N_, D, generator=g, dtype=torch.float64)
    streams = torch.randn(2 * n_, D, generator=g, dtype=torch.float64)
    lam = torch.tensor(0.3, dtype=torch.float64)
    if in_keys:
        v_hat = torch.randn(n_, D, generator=g, dtype=torch.float64)
        scores = big @ streams.T
        maps = softmax(scores[:, :n_]) - lam * softmax(scores[:, n_:])
        expected = maps @ v_hat
        args = (big, streams, v_hat)
    else:
        maps = softmax(streams @ big.T)
        expected = (maps[:n_] - lam * maps[n_:]) @ big
        args = (streams, big, big)
    got = stream_difference_op(*args, lam, in_keys, False)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if in_keys:
        query = torch.empty(1, 2, 0, D, requires_grad=True)
        tokens = torch.randn(1, 2, 2 * n_, D, requires_grad=True)
        out = stream_difference_op(
            query, tokens, torch.randn(1, 2, n_, D), lam.float(), True, False
        )
        assert out.shape == (1, 2, 0, D)
        assert not torch.autograd.grad(out.sum(), tokens)[0].any()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_keys, joint", [(False, False), (True, False), (True, True)])
def test_stream_maps_softmax_in_place_equals_the_out_of_place_softmax(
    device, dtype, in_keys, joint
):
    """The maps are the softmax taken in place of the scores (`out=` its own input): bit for bit
    torch.softmax's result, for short rows and for rows of thousands (other kernels on GPUs)."""
    g = torch.Generator().manual_seed(0)
    for rows, cols in [(16, 8), (8, 6000)]:
        query = torch.randn(2, 3, rows, D, generator=g).to(device, dtype)
        key = torch.randn(2, 3, cols, D, generator=g).to(device, dtype)
        scores = query @ key.transpose(-1, -2)
        split = (2, 3, rows, 2, cols // 2) if in_keys else (2, 3, 2, rows // 2, cols)
        expected = torch.softmax(scores if joint else scores.view(split), -1).view(split)
        assert torch.equal(attention.stream_maps(query, key, in_keys, joint), expected)


def test_stage_two_output_is_stored_with_the_heads_merged():
    """Merging Stage II's heads into (B, N, C) is a view of its output, not a copy."""
    q = torch.randn(2, HEADS, 16, D)
    tokens, v_hat = torch.randn(2, HEADS, 8, D), torch.randn(2, HEADS, 4, D)
    out = stream_difference_op(q, tokens, v_hat, torch.tensor(0.5), True, False)
    merged = attention.merge_heads(out)
    assert merged.is_contiguous() and merged.data_ptr() == out.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rms_norm_in_place_and_with_autograd_agree_with_f_rms_norm(dtype):
    """The norm without autograd (in place) and with it (saving x and the inverse RMS only)
    give the same values, those of F.rms_norm up to the rounding of the statistics; in float64
    the hand-written backward passes gradcheck."""
    g = torch.Generator().manual_seed(0)
    norm = attention.RMSNorm(D).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D, generator=g))
    x = torch.randn(2, 3, 5, D, generator=g).to(dtype)
    scale = torch.tensor(0.7, dtype=dtype)
    expected = torch.nn.functional.rms_norm(x, (D,), (norm.weight * scale).to(dtype), norm.eps)
    with_grad = norm(x.clone().requires_grad_(), scale)
    with torch.no_grad():
        in_place = x.clone()
        assert norm(in_place, scale).data_ptr() == in_place.data_ptr()
    assert torch.equal(with_grad.detach(), in_place)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(in_place, expected, rtol=tolerance, atol=tolerance)
    if dtype == torch.float64:
        weight = torch.randn(D, dtype=dtype, requires_grad=True)
        x = x.requires_grad_()
        for tokens in (x, x[0, 0, 0]):  # and a single token, with no leading dims
            assert torch.autograd.gradcheck(
                lambda a, w: attention.RMSNormFunction.apply(a, w, 1e-5), (tokens, weight)
            )


def test_vca_layer_memory_stays_within_a_quarter_of_mhsa_once_in_parts(monkeypatch):
    """With the maps in parts, Stage II written with the heads merged, the norms in place and
    the conv added in place, a forward holds qkv (3), the output and one more (N, C) tensor
    (the conv's) against MHSA's 4, and training's saved activations add at most a quarter
    (the norm keeps x and its inverse RMS, not the normalised x)."""
    from bench.attention import peak_memory_mb

    monkeypatch.setitem(attention.MIN_PART_ENTRIES, "cpu", 1)
    for backward in (False, True):
        peaks = {
            kind: peak_memory_mb(kind, "S", 1024, 1, torch.device("cpu"), "fp32", backward, "layer")
            for kind in ("mhsa", "vca")
        }
        assert peaks["vca"] <= 1.25 * peaks["mhsa"], (backward, peaks)
