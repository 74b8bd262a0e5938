"""The Triton stream kernels (models.triton_streams) against the aten kernels of the same op,
which tests/test_attention.py checks against float64 formulas: without a GPU on CPU tensors
through Triton's interpreter (conftest.py turns it on), in float64 and float32, which check the
kernels' arithmetic; with one on CUDA tensors, compiled, in the 16-bit dtypes the compiled
kernels take. The interpreter's bf16 tl.dot is wrong (it multiplies the raw bits), so 16-bit
operands are checked on CUDA only. Without a GPU, test_kernels_fit_the_gpus_shared_memory
compiles the kernels for GPUs and checks that they can launch there."""

import json
import os
import subprocess
import sys

import pytest
import torch

from models import attention
from models.attention import stream_difference_op

triton_streams = pytest.importorskip("models.triton_streams", exc_type=ImportError)

STAGES = [(False, False), (True, False), (True, True)]
STAGE_IDS = ["I", "II-separate", "II-joint"]
# (batch, heads, N, n, d): several row and key blocks with a split backward and sizes that are no
# power of two; DiT's 64 stream tokens (the most the kernels take) and XL's head width; one
# stream token per stream and the narrowest head.
SHAPES = [(2, 3, 150, 5, 12), (1, 2, 64, 64, 72), (3, 1, 17, 1, 8)]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETED:
    CASES = [("cpu", torch.float64), ("cpu", torch.float32)]
else:
    CASES = [("cuda", torch.bfloat16), ("cuda", torch.float16)]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}
DTYPE = CASES[0][1]  # of the tests below that need one the kernels take


def operands(in_keys, shape, dtype, device, generator):
    """query, key, value and lambda laid out as VCA passes them: heads as strided views of one
    qkv projection, the stream tokens of one head expanded over the batch."""
    batch, heads, tokens, n, d = shape

    def randn(*size):
        return torch.randn(*size, generator=generator, dtype=torch.float64).to(device, dtype)

    qkv = randn(batch, tokens, 3, heads, d).transpose(1, 3)  # (batch, heads, 3, N, d)
    streams = randn(1, heads, 2 * n, d).expand(batch, -1, -1, -1)
    lam = randn(()).abs()
    if in_keys:
        return qkv[:, :, 0], streams, randn(batch, heads, n, d), lam
    return streams, qkv[:, :, 1], qkv[:, :, 2], lam


def output_and_gradients(inputs, cotangent, in_keys, joint):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = stream_difference_op(*leaves, in_keys, joint)
    return (out, *torch.autograd.grad((out * cotangent).sum(), leaves))


@pytest.mark.parametrize(
    "device,dtype", CASES, ids=[f"{device}-{str(dtype)[6:]}" for device, dtype in CASES]
)
@pytest.mark.parametrize("shape", SHAPES, ids=["blocks", "xl-width", "smallest"])
@pytest.mark.parametrize("in_keys, joint", STAGES, ids=STAGE_IDS)
def test_triton_kernels_equal_the_aten_kernels(
    triton_stream_kernels, device, dtype, shape, in_keys, joint
):
    """Output and the gradients of query, key, value and lambda, strided and expanded operands
    as VCA passes them; 16-bit ones against the aten kernels in float64 on the same values."""
    inputs = operands(in_keys, shape, dtype, device, torch.Generator().manual_seed(0))
    assert attention._fused_kernels(*inputs[:3], in_keys) is triton_streams
    out_shape = stream_difference_op(*inputs, in_keys, joint).shape
    cotangent = torch.randn(out_shape, dtype=torch.float64).to(device, dtype)
    got = output_and_gradients(inputs, cotangent, in_keys, joint)

    attention.set_stream_kernel("aten")
    wide = dtype if dtype.itemsize > 2 else torch.float64
    inputs, cotangent = [t.to(wide) for t in inputs], cotangent.to(wide)
    want = output_and_gradients(inputs, cotangent, in_keys, joint)
    for name, g, w in zip(["out", "query", "key", "value", "lambda"], got, want, strict=True):
        assert g.dtype == dtype and g.shape == w.shape, name
        tol = TOLERANCE[dtype] * max(1.0, w.abs().max().item())
        torch.testing.assert_close(g.to(wide), w, rtol=0, atol=tol, msg=name)


@pytest.mark.parametrize("in_keys, joint", STAGES, ids=STAGE_IDS)
@pytest.mark.parametrize("shape", [(2, 3, 20, 16, 12), (1, 2, 9, 5, 16)], ids=["d12", "n5"])
def test_triton_kernels_pass_torch_library_opcheck(triton_stream_kernels, shape, in_keys, joint):
    """The op's and its backward op's outputs keep the shapes and strides their fake kernels
    give (torch.compile relies on them) with the Triton kernels too, at head widths and stream
    counts below the tiles' and equal to them."""
    device = "cpu" if INTERPRETED else "cuda"
    inputs = operands(in_keys, shape, DTYPE, device, torch.Generator().manual_seed(2))
    inputs = [t.detach().requires_grad_() for t in inputs]
    assert attention._fused_kernels(*inputs[:3], in_keys) is triton_streams
    torch.library.opcheck(stream_difference_op, (*inputs, in_keys, joint))
    grad = torch.randn_like(stream_difference_op(*inputs, in_keys, joint))
    backward_args = (grad, *(t.detach() for t in inputs), in_keys, joint)
    torch.library.opcheck(attention.stream_difference_backward, backward_args)


def test_operands_the_kernels_do_not_take_keep_the_aten_kernels(triton_stream_kernels):
    """More stream tokens or head channels than the tiles hold, no head axis, or no rows: the
    aten kernels run, and the op's result is theirs."""
    generator = torch.Generator().manual_seed(1)
    device = "cpu" if INTERPRETED else "cuda"
    most = triton_streams.MAX_STREAM_TOKENS
    widest = (1, 2, 40, most, triton_streams.MAX_HEAD_DIM)
    q, k, v, lam = operands(True, widest, DTYPE, device, generator)
    assert attention._fused_kernels(q, k, v, True) is triton_streams
    for in_keys in (True, False):
        q, k, v, lam = operands(in_keys, (1, 2, 40, most + 1, 8), DTYPE, device, generator)
        assert attention._fused_kernels(q, k, v, in_keys) is None
        assert attention._fused_kernels(q[0], k[0], v[0], in_keys) is None
        wide = (1, 2, 40, 4, triton_streams.MAX_HEAD_DIM + 1)
        q, k, v, lam = operands(in_keys, wide, DTYPE, device, generator)
        assert attention._fused_kernels(q, k, v, in_keys) is None
    q0, k0, v0, lam0 = operands(False, (1, 2, 0, 4, 8), DTYPE, device, generator)
    assert attention._fused_kernels(q0, k0, v0, False) is None
    assert stream_difference_op(q0, k0, v0, lam0, False, False).shape == (1, 2, 4, 8)
    q, k, v, lam = operands(True, (1, 2, 40, most + 1, 8), DTYPE, device, generator)
    attention.set_stream_kernel("aten")
    aten = stream_difference_op(q, k, v, lam, True, False)
    attention.set_stream_kernel("triton")
    torch.testing.assert_close(stream_difference_op(q, k, v, lam, True, False), aten)


def test_compiled_kernels_take_16_bit_operands_only(monkeypatch):
    """Compiled (no interpreter), fp32 and fp64 operands keep the aten kernels, whose cuBLAS
    GEMMs beat the kernels' FMA dots; supports() reads the interpreter setting at each call."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for dtype, taken in [(torch.float64, False), (torch.float32, False), (torch.float16, True)]:
        q, k, v, _ = operands(False, (1, 2, 16, 4, 8), dtype, "cpu", torch.Generator())
        assert triton_streams.supports(q, k, v, False) is taken, dtype
        q, k, v, _ = operands(True, (1, 2, 16, 4, 8), dtype, "cpu", torch.Generator())
        assert triton_streams.supports(q, k, v, True) is taken, dtype
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_streams.supports(q.double(), k.double(), v.double(), True)


def test_cpu_tensors_without_the_interpreter_keep_the_aten_kernels(monkeypatch):
    """runs_on reads the environment at each call; the kernels stay defined as they were."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, lam = operands(False, (1, 2, 16, 4, 8), torch.float32, "cpu", torch.Generator())
    with attention.using_stream_kernel("triton"):
        assert attention._fused_kernels(q, k, v, False) is None
        out = stream_difference_op(q, k, v, lam, False, False)
    torch.testing.assert_close(out, stream_difference_op(q, k, v, lam, False, False))


def test_set_stream_kernel_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="choose one of auto, traced, aten, triton"):
        attention.set_stream_kernel("cuda")
    assert attention.stream_kernel == "auto"


def test_kernels_fit_the_gpus_shared_memory(tmp_path):
    """Each kernel, compiled with the tiles it launches with at the largest operands it takes,
    fits the shared memory of a block on sm_89 (99 KB, as on sm_86 and sm_120, the smallest of
    the GPUs that run bf16) and on sm_90 (Hopper), with its registers nearly free of spills.
    Triton compiles for a GPU without one, so this runs on every machine."""
    out = tmp_path / "resources.json"
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "bench.triton_resources", "--archs", "89", "90"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(
        [*command, "--out", str(out)], cwd=repo, env=environment, check=True, timeout=600
    )
    rows = json.loads(out.read_text())["rows"]
    kernels = {"stage2_forward", "stage2_backward", "stage1_forward", "stage1_backward"}
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in kernels for a in (89, 90)}
    for row in rows:
        assert row["limit"] == {89: 99 << 10, 90: 227 << 10}[row["arch"]]
        assert 0 < row["shared"] <= row["limit"], row
        assert row["stack"] is None or row["stack"] <= 1024, row


def test_triton_resources_rejects_an_architecture_it_has_no_limit_for(capsys):
    from bench.triton_resources import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--archs", "75"])
    assert exit_info.value.code == 2
    assert "invalid choice: 75" in capsys.readouterr().err


def test_inductor_compiled_layer_runs_the_triton_kernels_with_eager_results(
    triton_stream_kernels, monkeypatch
):
    """A VCA layer compiled by inductor launches the Triton kernels from its opaque ops (on the
    CPU through the interpreter), forward and backward, and equals the eager layer: the kernels'
    outputs keep the strides the fake kernels promise."""
    device = "cpu" if INTERPRETED else "cuda"
    launches = []
    for name in ("forward", "backward"):
        kernel = getattr(triton_streams, name)
        spy = lambda *args, kernel=kernel, name=name: launches.append(name) or kernel(*args)  # noqa: E731
        monkeypatch.setattr(triton_streams, name, spy)
    generator = torch.Generator().manual_seed(0)
    layer = attention.build_attention("vca", 32, 4, (4, 6), 1, contrast_grid=(2, 2))
    layer = layer.to(device, DTYPE)
    x = torch.randn(3, 24, 32, generator=generator, dtype=torch.float64)
    x = x.to(device, DTYPE).requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    results = []
    for run in (layer, compiled):
        launches.clear()
        out = run(x)
        results.append([out, *torch.autograd.grad(out.float().square().sum(), [x])])
        assert launches == ["forward", "forward", "backward", "backward"]
    for got, expected in zip(results[1], results[0], strict=True):
        tol = TOLERANCE[DTYPE] * max(1.0, expected.abs().max().item())
        torch.testing.assert_close(got, expected, rtol=0, atol=tol)
