"""Token mixers for the DiT backbone: plain MHSA, Visual-Contrast Attention and its ablations,
and Differential Attention.

Every mixer takes and returns (B, N, C) tokens laid out on an H x W grid and owns `qkv` and
`proj` linear layers with the official DiT key names. MHSA and Differential Attention run on
`F.scaled_dot_product_attention`'s fused kernels. VCA never forms an N x N map: each of its
stages is one product of the N tokens with 2n stacked contrast-stream tokens
(`stream_difference_op`), O(N * n * d) per head, n being the number of contrast tokens.
"""

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

ATTENTIONS = ("mhsa", "vca", "stage1", "stage2", "emb", "diff", "diffattn")
ATTENTION_HELP = {
    "mhsa": "plain multi-head self-attention (DiT/SiT baseline)",
    "vca": "Visual-Contrast Attention: pooled contrast tokens, differential Stage I and II",
    "stage1": "VCA ablation: differential global contrast (Stage I) only",
    "stage2": "VCA ablation: differential per-patch attention (Stage II) only",
    "emb": "VCA ablation: contrast tokens from the learnable embeddings only, no pooling",
    "diff": "VCA ablation: language-style differential attention (split heads) in both stages, "
    "learnable tokens instead of pooled contrast tokens",
    "diffattn": "Differential Attention (Ye et al. 2024): half the heads, two softmax maps",
}


def lambda_init_for(layer_index):
    """Differential Transformer's depth schedule for the initial lambda (0-based block index):
    a float for an int, a tensor for a tensor."""
    exp = torch.exp if isinstance(layer_index, torch.Tensor) else math.exp
    return 0.8 - 0.6 * exp(-0.3 * layer_index)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with F.rms_norm's roundings: statistics in fp32 (or wider),
    x times their reciprocal rounded to x's dtype, then the weight. Written out because
    F.rms_norm returns a contiguous tensor (Stage II's output is stored with the heads merged,
    and a contiguous result would cost a copy of N x C to merge them) and its autograd keeps
    both x and the normalised x for the backward."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """RMSNorm(x) * scale; the scale folds into the weight, saving a pass over x. Without
        autograd (sampling, evaluation) x is normalised in place, as the fresh output of an
        attention stage that nothing else reads, and no x-sized temporary is made."""
        weight = (self.weight * scale).to(x.dtype)
        if torch.is_grad_enabled():
            return RMSNormFunction.apply(x, weight, self.eps)
        return x.mul_(inverse_rms(x, self.eps)).mul_(weight)


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim in fp32 or wider: no x-sized temporary for
    fp32 and float64 x (vector_norm widens a bf16 x on the CPU first)."""
    stats = torch.promote_types(x.dtype, torch.float32)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=stats)
    return norm.square_().div_(x.shape[-1]).add_(eps).rsqrt_()


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm(x) * weight that saves x and the (rows x 1) inverse RMS for the backward, and
    recomputes the normalised x there: one x-sized tensor fewer in a training step's saved
    activations than autograd of the formula."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        inverse = inverse_rms(x, eps)
        ctx.save_for_backward(x, weight, inverse)
        return normalised(x, inverse).mul_(weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight, inverse = ctx.saved_tensors
        leading = tuple(range(x.dim() - 1))
        grad_weight = grad * normalised(x, inverse)
        grad_weight = grad_weight.sum(leading) if leading else grad_weight
        grad_normed = (grad * weight).to(inverse.dtype)
        # d/dx of x * r with r = (mean(x^2) + eps)^(-1/2): r * g - x * r^3 * mean(g * x)
        correction = (grad_normed * x).mean(-1, keepdim=True) * inverse.square()
        grad_x = grad_normed.sub_(x * correction).mul_(inverse)
        return grad_x.to(x.dtype), grad_weight, None


def normalised(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x * inverse computed in inverse's dtype and stored in x's dtype and layout; for a
    narrower x (bf16) in place into a copy, with no wide x-sized tensor between."""
    return x * inverse if x.dtype == inverse.dtype else x.clone().mul_(inverse)


class DiffLambda(nn.Module):
    """lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init: one scalar shared by all heads.

    The block index is an integer buffer and lambda_init a tensor computed from it, not a Python
    float: blocks of every depth then share one compiled graph instead of each recompiling for a
    constant of its own."""

    def __init__(self, dim: int, layer_index: int):
        super().__init__()
        self.q1 = nn.Parameter(torch.zeros(dim).normal_(0, 0.1))
        self.k1 = nn.Parameter(torch.zeros(dim).normal_(0, 0.1))
        self.q2 = nn.Parameter(torch.zeros(dim).normal_(0, 0.1))
        self.k2 = nn.Parameter(torch.zeros(dim).normal_(0, 0.1))
        self.register_buffer("layer_index", torch.tensor(layer_index), persistent=False)

    @property
    def lambda_init(self) -> float:
        return lambda_init_for(int(self.layer_index))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lambda, lambda_init) as 0-d tensors in fp32 (float64 in a float64 model)."""
        dtype = torch.promote_types(self.q1.dtype, torch.float32)
        q1, k1, q2, k2 = (p.to(dtype) for p in (self.q1, self.k1, self.q2, self.k2))
        init = lambda_init_for(self.layer_index.to(dtype))
        return torch.exp(torch.dot(q1, k1)) - torch.exp(torch.dot(q2, k2)) + init, init


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """(B, M, N, d) -> (B, N, M*d)."""
    return out.transpose(1, 2).flatten(2)


class Attention(nn.Module):
    """Multi-head self-attention with DiT's parameter layout (qkv with bias, proj).

    The token mixers differ only in `mix(q, k, v)`, which the attention benchmark also times
    alone: the projections around it are the same in all of them."""

    def __init__(self, dim: int, num_heads: int, **_unused):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor):
        """(B, N, C) -> q, k, v of shape (B, heads, N, C / heads), views of one projection."""
        B, N, _ = x.shape
        return self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def mix(self, q, k, v) -> torch.Tensor:
        return merge_heads(F.scaled_dot_product_attention(q, k, v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.mix(*self.split_heads(x)))


class DifferentialAttention(Attention):
    """Differential Attention (Ye et al. 2024) at the same width: M/2 heads, each splitting its
    2d query/key channels into two d-dim groups whose softmax maps are subtracted.
    O = (1 - lambda_init) * RMSNorm((softmax(q1 k1) - lambda * softmax(q2 k2)) v)."""

    def __init__(self, dim: int, num_heads: int, layer_index: int = 0, **_unused):
        if num_heads % 2:
            raise ValueError(f"diffattn needs an even number of heads, got {num_heads}")
        super().__init__(dim, num_heads // 2)
        head_dim = dim // num_heads
        self.lambda_init = lambda_init_for(layer_index)
        self.lam = DiffLambda(head_dim, layer_index)
        self.norm = RMSNorm(2 * head_dim)

    def mix(self, q, k, v) -> torch.Tensor:
        q1, q2 = q.chunk(2, dim=-1)
        k1, k2 = k.chunk(2, dim=-1)
        lam, init = self.lam()
        negative = F.scaled_dot_product_attention(q2, k2, v)
        out = torch.addcmul(F.scaled_dot_product_attention(q1, k1, v), negative, lam, value=-1)
        return merge_heads(self.norm(out, 1 - init))


CUSTOM_OP_BODIES = {}


def custom_op(name: str):
    """torch.library.custom_op `vca_dit::name` that also files its Python body under the op in
    CUSTOM_OP_BODIES, for InlineCustomOps."""

    def register(body):
        op = torch.library.custom_op(f"vca_dit::{name}", body, mutates_args=())
        CUSTOM_OP_BODIES[getattr(torch.ops.vca_dit, name).default] = body
        return op

    return register


class InlineCustomOps(TorchDispatchMode):
    """Runs this module's custom ops as their Python bodies, so that an enclosing dispatch mode
    (a FLOP counter, a count of live tensor bytes) sees the aten ops inside them. Enter it
    inside the counting mode: `with FlopCounterMode() as counter, InlineCustomOps(): ...`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        body = CUSTOM_OP_BODIES.get(func)
        if body is None:
            return func(*args, **(kwargs or {}))
        with self:
            return body(*args, **(kwargs or {}))


def stream_maps(query, key, in_keys: bool, joint: bool) -> torch.Tensor:
    """softmax(query @ key^T) with the stream axis split out: (..., L, 2, n) when the streams
    are the keys, (..., 2, n, S) when they are the queries. The softmax is taken in place of
    the scores, so the maps are the only map-sized tensor. The backward calls it again and gets
    the forward's maps exactly."""
    scores = query @ key.transpose(-1, -2)
    *batch, rows, cols = scores.shape
    streams = (*batch, rows, 2, cols // 2) if in_keys else (*batch, 2, rows // 2, cols)
    rows_of_one_softmax = scores if joint else scores.view(streams)
    torch.softmax(rows_of_one_softmax, -1, out=rows_of_one_softmax)
    return scores.view(streams)


MAP_SHARE = 4  # a part's maps hold at most 1/MAP_SHARE of the entries of the N-token operand
# ... unless that makes parts smaller than this, by device type: 2 MB of fp32 on CPUs (half of
# it made batch-1 XL/256 and S/1024 2-5% slower: README, Speed); 32 MB of bf16 elsewhere, where
# a launch costs more and memory less (not yet measured on a GPU).
MIN_PART_ENTRIES = {"cpu": 1 << 19, "other": 1 << 24}


def product_parts(query, key, in_keys: bool):
    """The parts a stream-difference product runs in, as (index of query, grad and output;
    index of key and value): the query rows in Stage II (`in_keys`), where key and value are
    the few stream tokens every row reads; the heads in Stage I.

    With 2n map columns per d-wide token, the maps of a whole stage outweigh the N-token
    tensors (2x at n = d) and would set the layer's peak memory; in parts they stay a quarter
    of one (in Stage I at most one head's share: a third at DiT-S's 6 heads). Parts below
    MIN_PART_ENTRIES map entries are not split further: each part costs about 50 us of fixed
    overhead on this CPU (kernel launches on a GPU), which at batch 1 and 256 tokens makes 8
    parts twice as slow as one product, while parts above it cost no time that the noise of
    the machine lets us see."""
    axis = -2 if in_keys else -3
    if query.dim() < -axis:  # no head axis to split: one product
        yield (...,), (...,)
        return
    tokens = query if in_keys else key
    map_entries = query.shape[:-1].numel() * key.shape[-2]
    length = query.shape[axis]
    by_share = -(-MAP_SHARE * map_entries // max(tokens.numel(), 1))
    smallest = MIN_PART_ENTRIES.get(query.device.type, MIN_PART_ENTRIES["other"])
    parts = max(1, min(length, by_share, map_entries // smallest))
    step = max(1, -(-length // parts))
    for start in range(0, length, step):
        rows = slice(start, start + step)
        if in_keys:
            yield (..., rows, slice(None)), (...,)
        else:
            heads = (..., rows, slice(None), slice(None))
            yield heads, heads


def stream_difference_output(query, value, in_keys):
    """An empty output of the op: Stage II's (B, M, N, d) heads are stored as (B, N, M, d),
    so that merging the heads afterwards is a view, not a copy of N x C."""
    *lead, rows, _ = query.shape
    if not in_keys:
        return query.new_empty(*lead, rows // 2, value.shape[-1])
    *batch, heads = lead or [1]
    merged = query.new_empty(*batch, rows, heads, value.shape[-1])
    return merged.transpose(-2, -3).reshape(*lead, rows, value.shape[-1])


STREAM_KERNELS = ("auto", "traced", "aten", "triton")
stream_kernel = "auto"  # set with set_stream_kernel


def set_stream_kernel(name: str) -> None:
    """Which kernels run the stream-difference products, process-wide:
    - "auto" (the default): "traced" where torch.compile traces a training step (autograd
      on), "aten" elsewhere: eager, and compiled sampling, where the op's in-place softmax and
      parts hold less memory (docs/speed.md times both);
    - "traced": plain autograd ops (`traced_stream_difference`) that torch.compile sees and
      fuses with the softmaxes, the map difference and the norms around them;
    - "aten": the custom op `stream_difference_op`, batched GEMMs and softmaxes in
      `product_parts`, its maps recomputed in its own backward; one opaque node when compiled;
    - "triton": that op in models.triton_streams' fused kernels, on CUDA tensors (other devices
      and shapes keep the aten kernels).
    torch.compile reads the choice when it traces, and traces again when it changes."""
    global stream_kernel
    if name not in STREAM_KERNELS:
        choices = ", ".join(STREAM_KERNELS)
        raise ValueError(f"unknown stream kernel {name!r}; choose one of {choices}")
    if name == "triton":  # fail here, not mid-step, without Triton
        try:
            import models.triton_streams  # noqa: F401
        except ImportError as error:
            message = "the triton stream kernel needs Triton (torch's Linux wheels bundle it)"
            raise ImportError(message) from error
    stream_kernel = name


@contextlib.contextmanager
def using_stream_kernel(name: str):
    """set_stream_kernel(name) for the calls inside, and their backwards if they run inside too;
    the kernel before it again after."""
    previous = stream_kernel
    set_stream_kernel(name)
    try:
        yield
    finally:
        set_stream_kernel(previous)


def _fused_kernels(query, key, value, in_keys):
    """models.triton_streams when it is chosen and takes these operands, else None."""
    if stream_kernel != "triton":
        return None
    from models import triton_streams

    runs = triton_streams.runs_on(query) and triton_streams.supports(query, key, value, in_keys)
    return triton_streams if runs else None


@custom_op("stream_difference")
def stream_difference_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lam: torch.Tensor,
    in_keys: bool,
    joint: bool,
) -> torch.Tensor:
    """(A+ - lam A-) @ value for the two contrast streams stacked in one attention product, A
    the softmax of query @ key^T (the stream tokens come scaled by the softmax scale).

    The streams are the two halves of the queries (`in_keys=False`, Stage I: 2n stream queries
    against the N keys) or of the keys (`in_keys=True`, Stage II: the N queries against 2n
    stream keys; the softmax is taken per stream, or over both with `joint`). One product
    scores both streams, and the difference of the maps is taken before the values are
    multiplied: 3 n N d multiply-adds per head and stage, no N x d result per stream. Large
    products run in `product_parts`, so that their maps stay a fraction of an N-token tensor.

    The backward recomputes the maps instead of keeping them, as flash attention does: a
    layer's saved activations hold no (N x 2n) map per head, at the price of one more
    query @ key^T product and softmax. A custom op, so that torch.compile runs the same
    kernels: traced, its partitioner would fold the recompute back into saved maps, and each
    block would compile a dozen more generated kernels (1.55x MHSA's compile time, against
    1.36x as an opaque op)."""
    out = stream_difference_output(query, value, in_keys)
    fused = _fused_kernels(query, key, value, in_keys)
    if fused is not None:
        fused.forward(query, key, value, lam, in_keys, joint, out)
        return out
    for part, shared in product_parts(query, key, in_keys):
        _stream_difference(query[part], key[shared], value[shared], lam, in_keys, joint, out[part])
    return out


def _stream_difference(query, key, value, lam, in_keys, joint, out):
    """One part into `out`; its maps die on return, before the next part forms its own."""
    pos, neg = stream_maps(query, key, in_keys, joint).unbind(-2 if in_keys else -3)
    torch.matmul(pos.addcmul_(neg, lam, value=-1), value, out=out)  # the difference into pos


@stream_difference_op.register_fake
def _(query, key, value, lam, in_keys, joint):
    return stream_difference_output(query, value, in_keys)


@custom_op("stream_difference_backward")
def stream_difference_backward(
    grad: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lam: torch.Tensor,
    in_keys: bool,
    joint: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of stream_difference_op for query, key, value and lam, in the forward's
    parts: Stage II's parts share key and value, whose gradients add up over them."""
    fused = _fused_kernels(query, key, value, in_keys)
    if fused is not None:
        return fused.backward(grad, query, key, value, lam, in_keys, joint)
    parts = list(product_parts(query, key, in_keys))
    if len(parts) == 1:
        return _stream_difference_grads(grad, query, key, value, lam, in_keys, joint)
    # contiguous, as the fake kernel says: zeros_like would copy the strides of a head view
    grad_query = query.new_empty(query.shape)
    grad_key, grad_value, grad_lam = (t.new_zeros(t.shape) for t in (key, value, lam))
    for part, shared in parts:
        grads = _stream_difference_grads(
            grad[part], query[part], key[shared], value[shared], lam, in_keys, joint
        )
        grad_query[part] = grads[0]
        grad_key[shared] += grads[1]
        grad_value[shared] += grads[2]
        grad_lam += grads[3]
    return grad_query, grad_key, grad_value, grad_lam


def _stream_difference_grads(grad, query, key, value, lam, in_keys, joint):
    attn = stream_maps(query, key, in_keys, joint)
    pos, neg = attn.unbind(-2 if in_keys else -3)
    grad_value = torch.addcmul(pos, neg, lam, value=-1).transpose(-1, -2) @ grad
    grad_lam = _softmax_backward_into_maps(pos, neg, grad @ value.transpose(-1, -2), lam, joint)
    grad_scores = attn.reshape(*grad.shape[:-2], query.shape[-2], key.shape[-2])
    return grad_scores @ key, grad_scores.transpose(-1, -2) @ query, grad_value, grad_lam


def _softmax_backward_into_maps(pos, neg, grad_diff, lam, joint):
    """Turns the maps into their scores' gradient, A * (dA - sum(dA * A)) per row with
    dA+ = grad_diff and dA- = -lam * grad_diff, and returns lam's gradient. Written into the
    maps and, last, into grad_diff: no (rows x 2n) gradient beside them, and grad_diff is
    gone before the products with query and key."""
    dot_pos = (grad_diff * pos).sum(-1, keepdim=True)
    dot_neg = (grad_diff * neg).sum(-1, keepdim=True)
    grad_lam = -dot_neg.sum(dtype=lam.dtype)
    if joint:  # one normaliser for both streams
        sub_pos = sub_neg = torch.addcmul(dot_pos, dot_neg, lam, value=-1)
    else:
        sub_pos, sub_neg = dot_pos, dot_neg * -lam
    neg.mul_(torch.addcmul(-sub_neg, grad_diff, lam, value=-1))
    pos.mul_(grad_diff.sub_(sub_pos))
    return grad_lam


@stream_difference_backward.register_fake
def _(grad, query, key, value, lam, in_keys, joint):
    return tuple(t.new_empty(t.shape) for t in (query, key, value, lam))


def _stream_difference_setup(ctx, inputs, output):
    query, key, value, lam, ctx.in_keys, ctx.joint = inputs
    ctx.save_for_backward(query, key, value, lam)


def _stream_difference_grad(ctx, grad):
    grads = stream_difference_backward(grad, *ctx.saved_tensors, ctx.in_keys, ctx.joint)
    return (*grads, None, None)


stream_difference_op.register_autograd(
    _stream_difference_grad, setup_context=_stream_difference_setup
)


def stream_difference(query, key, value, lam, in_keys: bool, joint: bool = False):
    """(A+ - lam A-) @ value (see stream_difference_op) by the chosen stream kernel, with key and
    value in the query's dtype."""
    dtype = query.dtype
    key, value = key.to(dtype), value.to(dtype)
    compiled_training = torch.compiler.is_compiling() and torch.is_grad_enabled()
    traced = stream_kernel == "traced" or (stream_kernel == "auto" and compiled_training)
    if traced:
        return traced_stream_difference(query, key, value, lam, in_keys, joint)
    return stream_difference_op(query, key, value, lam, in_keys, joint)


def traced_stream_difference(query, key, value, lam, in_keys: bool, joint: bool):
    """stream_difference_op's result in plain autograd ops, for torch.compile to trace: inductor
    fuses the softmaxes and the map difference with the products and the ops around them. The
    activation checkpoint has the partitioner recompute the maps in the backward from query,
    key and value, as the op's own backward does, instead of saving them."""
    return checkpoint(
        stream_difference_formula, query, key, value, lam, in_keys, joint, use_reentrant=False
    )


def stream_difference_formula(query, key, value, lam, in_keys: bool, joint: bool):
    scores = query @ key.transpose(-1, -2)
    if in_keys:  # Stage II: the streams are the two halves of the map's columns
        if joint:
            maps = scores.softmax(-1)
        else:
            maps = scores.unflatten(-1, (2, -1)).softmax(-1).flatten(-2)
        pos, neg = maps.chunk(2, -1)
    else:  # Stage I: of its rows
        pos, neg = scores.softmax(-1).chunk(2, -2)
    return (pos - lam * neg) @ value


class VisualContrastAttention(Attention):
    """Visual-Contrast Attention (Linear Differential ViT, NeurIPS 2025) and its ablations.

    Contrast tokens: the queries average-pooled from the H x W token grid to h x w (n = h*w),
    plus two learnable embeddings e+ / e- giving a positive and a negative stream.
    Stage I: both streams attend to all N keys; v_hat = (1 - li) RMSNorm(v+ - lambda1 v-).
    Stage II: the N queries attend to the streams (as keys) with values v_hat;
    O = (1 - li) RMSNorm((A+ - lambda2 A-) v_hat), A+/A- two softmaxes over n columns
    (`stage2_softmax="separate"`) or halves of one softmax over 2n (`"joint"`).
    A 3x3 depthwise convolution of v on the grid is added before `proj` (`dwc=True`).

    `prefix_tokens` tokens at the front of the sequence (a ViT's class token) have no place on
    the grid: they take no part in the pooling and the conv, but serve as keys and values in
    Stage I and as queries in Stage II like every patch.

    `variant` picks the ablation: "vca" (full), "stage1" / "stage2" (only that stage is
    differential; the other uses the positive stream alone, with no norm), "emb" (streams are
    e+ / e- alone, no pooled content), "diff" (one set of learnable tokens; each stage is a
    language-style differential attention that splits head channels into two groups).

    Both streams run as one attention product per stage (`stream_difference_op`): 6 n N d
    multiply-adds per head in all, against plain attention's 2 N^2 d.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: tuple[int, int],
        layer_index: int = 0,
        variant: str = "vca",
        contrast_grid: int | tuple[int, int] = 8,
        stage2_softmax: str = "separate",
        dwc: bool = True,
        prefix_tokens: int = 0,
    ):
        super().__init__(dim, num_heads)
        if variant not in ("vca", "stage1", "stage2", "emb", "diff"):
            raise ValueError(f"unknown VCA variant {variant!r}")
        if stage2_softmax not in ("separate", "joint"):
            raise ValueError(
                f"stage2_softmax must be 'separate' or 'joint', got {stage2_softmax!r}"
            )
        if variant == "diff" and stage2_softmax == "joint":
            raise ValueError("the 'diff' variant has no dual streams to share a joint softmax")
        self.head_dim = dim // num_heads
        self.grid_size = tuple(grid_size)
        self.prefix_tokens = prefix_tokens
        if isinstance(contrast_grid, int):
            contrast_grid = (contrast_grid, contrast_grid)
        self.contrast_grid = (
            min(contrast_grid[0], grid_size[0]),
            min(contrast_grid[1], grid_size[1]),
        )
        n = self.contrast_grid[0] * self.contrast_grid[1]
        self.variant = variant
        self.stage2_softmax = stage2_softmax
        self.lambda_init = lambda_init_for(layer_index)
        self.stage1_diff = variant in ("vca", "stage1", "emb", "diff")
        self.stage2_diff = variant in ("vca", "stage2", "emb", "diff")

        self.contrast_pos = nn.Parameter(torch.randn(n, dim))
        self.contrast_neg = None if variant == "diff" else nn.Parameter(torch.randn(n, dim))
        lam_dim = self.head_dim // 2 if variant == "diff" else self.head_dim
        if self.stage1_diff:
            self.lambda1 = DiffLambda(lam_dim, layer_index)
            self.norm1 = RMSNorm(self.head_dim)
        if self.stage2_diff:
            self.lambda2 = DiffLambda(lam_dim, layer_index)
            self.norm2 = RMSNorm(self.head_dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if dwc else None

    def _grid(self, t: torch.Tensor) -> torch.Tensor:
        """(B, M, N, d) heads -> (B, C, H, W) image of the grid tokens with heads-major channels,
        as a view when the heads come straight from the qkv projection (no copy of N x C)."""
        t = t[:, :, self.prefix_tokens :]
        return t.transpose(1, 2).reshape(t.shape[0], *self.grid_size, -1).permute(0, 3, 1, 2)

    def _stream_tokens(self, q: torch.Tensor) -> torch.Tensor:
        """The positive and negative contrast tokens stacked as (B, M, 2n, d), times the softmax
        scale. "diff" has one set of tokens: its two streams are that set's two channel halves,
        each zero in the other half, so a product over all d channels scores one group."""
        B, M, _, d = q.shape
        pos = self.contrast_pos.to(q.dtype)
        neg = pos if self.contrast_neg is None else self.contrast_neg.to(q.dtype)
        streams = torch.stack([pos, neg]).unflatten(-1, (M, d))  # (2, n, M, d)
        tokens = streams.permute(2, 0, 1, 3).unsqueeze(0)  # (1, M, 2, n, d)
        if self.variant == "diff":
            first_half = torch.arange(d, device=q.device) < d // 2
            halves = torch.stack([first_half, ~first_half]).unsqueeze(1)  # (2, 1, d)
            tokens = tokens * (halves.to(q.dtype) * (d // 2) ** -0.5)
        elif self.variant == "emb":
            tokens = tokens * d**-0.5
        else:
            content = average_pool(self._grid(q), self.contrast_grid).flatten(2)
            content = content.unflatten(1, (M, d)).transpose(-1, -2).unsqueeze(2)
            tokens = (content + tokens).mul_(d**-0.5)
        return tokens.flatten(2, 3).expand(B, -1, -1, -1)

    def mix(self, q, k, v) -> torch.Tensor:
        out = merge_heads(self._contrast_stages(q, k, v))
        if self.dwc is not None:
            conv = self._depthwise_conv(v)
            # In place into Stage II's own output (flash attention's is saved for its backward):
            # no third N x C tensor beside the two.
            out = out.add_(conv) if self.stage2_diff else out + conv
        return out

    def _contrast_stages(self, q, k, v) -> torch.Tensor:
        """Stage I and Stage II, as (B, M, N, d) heads (stored merged when Stage II is
        differential). The contrast tokens and v_hat die when it returns, before the conv."""
        tokens = self._stream_tokens(q)
        pos = tokens[:, :, : tokens.shape[2] // 2]
        if self.stage1_diff:
            lam, init = self.lambda1()
            v_hat = self.norm1(stream_difference(tokens, k, v, lam, in_keys=False), 1 - init)
        else:
            v_hat = F.scaled_dot_product_attention(pos, k, v, scale=1.0)
        if not self.stage2_diff:
            return F.scaled_dot_product_attention(q, pos, v_hat.to(q.dtype), scale=1.0)
        lam, init = self.lambda2()
        joint = self.stage2_softmax == "joint"
        out = stream_difference(q, tokens, v_hat, lam, in_keys=True, joint=joint)
        return self.norm2(out, 1 - init)

    def _depthwise_conv(self, v: torch.Tensor) -> torch.Tensor:
        """`dwc` of the (B, M, N, d) heads v on the grid, as (B, N, C) tokens (zero at the
        prefix tokens)."""
        weight, bias = self.dwc.weight.to(v.dtype), self.dwc.bias.to(v.dtype)
        conv = depthwise_conv3x3(self._grid(v), weight, bias)
        return F.pad(conv, (0, 0, self.prefix_tokens, 0)) if self.prefix_tokens else conv


def average_pool(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """F.adaptive_avg_pool2d(grid, size), as means over blocks where `size` divides the grid
    (always, on the square grids of DiT): torch.compile fuses those, and their backward, with
    the ops around them, where adaptive pooling's backward is an aten kernel of its own."""
    B, C, H, W = grid.shape
    h, w = size
    if H % h or W % w:
        return F.adaptive_avg_pool2d(grid, size)
    return grid.reshape(B, C, h, H // h, w, W // w).mean((3, 5))


@custom_op("depthwise_conv3x3")
def depthwise_conv3x3(grid: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """3x3 depthwise convolution (zero padding) of a (B, C, H, W) grid, returned as (B, H*W, C)
    tokens. A custom op, so torch.compile sees one opaque node: an aten convolution in the graph
    turns on inductor's layout optimisation (always on CPUs with oneDNN), which stores the 4-D
    tensors up to the graph's last convolution channels-last, the (B, M, N, d) attention
    tensors of every block included, and the attention kernels become slow strided loops."""
    out = F.conv2d(grid, weight, bias, padding=1, groups=grid.shape[1])
    return out.flatten(2).transpose(1, 2).contiguous()


@depthwise_conv3x3.register_fake
def _(grid, weight, bias):
    B, C, H, W = grid.shape
    return grid.new_empty(B, H * W, C)


@custom_op("depthwise_conv3x3_backward")
def depthwise_conv3x3_backward(
    grad: torch.Tensor, grid: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of depthwise_conv3x3 for the grid (channels-last), weight and bias."""
    B, C, H, W = grid.shape
    grad_image = grad.transpose(1, 2).reshape(B, C, H, W)
    grad_grid, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_image, grid, weight, [C], [1, 1], [1, 1], [1, 1], False, [0, 0], C, [True] * 3
    )
    return grad_grid.contiguous(memory_format=torch.channels_last), grad_weight, grad_bias


@depthwise_conv3x3_backward.register_fake
def _(grad, grid, weight):
    grad_grid = torch.empty_like(grid, memory_format=torch.channels_last)
    return grad_grid, torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _depthwise_conv3x3_setup(ctx, inputs, output):
    grid, weight, _ = inputs
    ctx.save_for_backward(grid, weight)


def _depthwise_conv3x3_grad(ctx, grad):
    return depthwise_conv3x3_backward(grad, *ctx.saved_tensors)


depthwise_conv3x3.register_autograd(_depthwise_conv3x3_grad, setup_context=_depthwise_conv3x3_setup)


def build_attention(kind: str, dim: int, num_heads: int, grid_size, layer_index: int, **opts):
    """Construct the token mixer `kind` for block `layer_index`; opts go to VCA variants only."""
    if kind == "mhsa":
        return Attention(dim, num_heads)
    if kind == "diffattn":
        return DifferentialAttention(dim, num_heads, layer_index=layer_index)
    if kind in ("vca", "stage1", "stage2", "emb", "diff"):
        return VisualContrastAttention(
            dim, num_heads, grid_size, layer_index=layer_index, variant=kind, **opts
        )
    raise ValueError(f"unknown attention {kind!r}; choose one of {', '.join(ATTENTIONS)}")
