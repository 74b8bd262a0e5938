"""Triton kernels for VCA's stream-difference products, forward and backward: each stage's
scores, softmaxes, map difference and value product in one kernel, with no map in memory.
Opt-in through `models.attention.set_stream_kernel("triton")` until GPU rows show them faster
than the aten kernels. CUDA tensors run compiled; with TRITON_INTERPRET=1 set before this module
is imported, CPU tensors run in Triton's interpreter, which is how the tests check them.

Per (batch, head), with the stream tokens already scaled by the softmax scale:
- Stage II (`in_keys`): the N queries against the 2n stream keys. A program takes a block of
  query rows and all 2n keys, so both softmaxes (or the joint one) are whole in it.
- Stage I: the 2n stream queries against the N keys, flash-style: one program per head walks
  the key blocks with an online softmax per stream. Each stream's output is formed apart and the
  difference taken after (4 n N d multiply-adds instead of the aten kernels' 3 n N d, the price
  of never holding a row's whole map).
"""

import contextlib
import os

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 64  # Stage II query rows per program of the forward
# Stage II query rows per step of the backward, which keeps the gradients of the 2n keys and the
# n values resident beside the row block's temporaries, as flash attention 2's key-stationary
# backward does.
BLOCK_ROWS_BACKWARD = 16
BLOCK_KEYS = 32  # Stage I keys per step of the online softmax
PROGRAMS = 256  # Stage II's backward splits its rows until about this many programs run
NUM_WARPS = 8
# These tiles, at the largest stream count and head width below, keep every kernel's shared
# memory within the per-block limit of each GPU that runs bf16 (99 KB on sm_86/89/120) with its
# registers nearly free of spills: `python -m bench.triton_resources` compiles the kernels for
# these GPUs without one and shows it (the first guesses, 32 rows, 64 keys and 4 warps, needed
# 100-112 KB at XL's head width, and 184 KB with 128 stream tokens). Their speed is a guess until
# a GPU times them.
MAX_STREAM_TOKENS = 64
MAX_HEAD_DIM = 128
# Compiled, the kernels take 16-bit operands, as flash attention does. With fp32 or fp64 tiles
# tl.dot runs on the FMA units, its operands take up to 4x the shared memory and its registers
# spill (same tool, sm_90: fp32 Stage I backward 224 KB, over sm_80's and sm_89's limits, with
# 12 KB of stack per thread; fp64 up to 448 KB, over every GPU's). Wider operands keep the aten
# kernels (cuBLAS), except in the interpreter, where the tests check the kernels' arithmetic
# in float64.
COMPILED_DTYPES = (torch.float16, torch.bfloat16)


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1, read at each call)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(tensor: torch.Tensor) -> bool:
    """Whether these kernels run on `tensor`'s device: CUDA, or any device under the interpreter."""
    return tensor.is_cuda or interpreted()


def supports(query, key, value, in_keys: bool) -> bool:
    """The operands the kernels take: 4-D (batch, heads, rows, d), none empty, at most
    MAX_STREAM_TOKENS tokens per stream (a head's stream tokens sit in one program's registers)
    and MAX_HEAD_DIM channels per head; compiled, in a 16-bit dtype."""
    operands = (query, key, value)
    streams = key if in_keys else query
    four_d = all(t.dim() == 4 and t.numel() > 0 for t in operands)
    if not four_d or streams.shape[-2] // 2 > MAX_STREAM_TOKENS:
        return False
    narrow = max(query.shape[-1], value.shape[-1]) <= MAX_HEAD_DIM
    return narrow and (interpreted() or query.dtype in COMPILED_DTYPES)


@triton.jit
def _tile(ptr, rows, cols, stride_row, stride_col, num_rows, num_cols):
    mask = (rows[:, None] < num_rows) & (cols[None, :] < num_cols)
    offsets = rows[:, None] * stride_row + cols[None, :] * stride_col
    return tl.load(ptr + offsets, mask=mask, other=0)


@triton.jit
def _streams(ptr, rows, cols, stride_row, stride_col, n, num_cols):
    """One head's positive and negative stream tokens: its rows [0, n) and [n, 2n)."""
    pos = _tile(ptr, rows, cols, stride_row, stride_col, n, num_cols)
    return pos, _tile(ptr + n * stride_row, rows, cols, stride_row, stride_col, n, num_cols)


@triton.jit
def _store(ptr, rows, cols, stride_row, stride_col, num_rows, num_cols, tile):
    mask = (rows[:, None] < num_rows) & (cols[None, :] < num_cols)
    offsets = rows[:, None] * stride_row + cols[None, :] * stride_col
    tl.store(ptr + offsets, tile.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b, ACC: tl.constexpr):
    """a @ b in b's dtype (a rounded to it, as flash attention rounds its maps), summed in ACC."""
    return tl.dot(a.to(b.dtype), b, out_dtype=ACC, input_precision="ieee")


@triton.jit
def _key_stream_maps(q, k_pos, k_neg, key_ok, JOINT: tl.constexpr, ACC: tl.constexpr):
    """A+ and A- of a block of queries against all stream keys (Stage II)."""
    s_pos = tl.where(key_ok[None, :], _dot(q, tl.trans(k_pos), ACC), float("-inf"))
    s_neg = tl.where(key_ok[None, :], _dot(q, tl.trans(k_neg), ACC), float("-inf"))
    m_pos = tl.max(s_pos, 1)
    m_neg = tl.max(s_neg, 1)
    if JOINT:
        m_pos = tl.maximum(m_pos, m_neg)
        m_neg = m_pos
    e_pos = tl.exp(s_pos - m_pos[:, None])
    e_neg = tl.exp(s_neg - m_neg[:, None])
    z_pos = tl.sum(e_pos, 1)
    z_neg = tl.sum(e_neg, 1)
    if JOINT:
        z_pos = z_pos + z_neg
        z_neg = z_pos
    return e_pos / z_pos[:, None], e_neg / z_neg[:, None]


@triton.jit
def _stage2_forward(
    q_ptr, k_ptr, v_ptr, lam_ptr, out_ptr,
    sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, so0, so1, so2, so3,
    heads, rows, n, d,
    JOINT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: a batch can pass 2^31 elements
    b = bh // heads
    h = bh % heads
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_D)
    k_pos, k_neg = _streams(k_ptr + b * sk0 + h * sk1, j, c, sk2, sk3, n, d)
    v = _tile(v_ptr + b * sv0 + h * sv1, j, c, sv2, sv3, n, d)
    q = _tile(q_ptr + b * sq0 + h * sq1, r, c, sq2, sq3, rows, d)
    lam = tl.load(lam_ptr).to(ACC)
    a_pos, a_neg = _key_stream_maps(q, k_pos, k_neg, j < n, JOINT, ACC)
    out = _dot(a_pos - lam * a_neg, v, ACC)
    _store(out_ptr + b * so0 + h * so1, r, c, so2, so3, rows, d, out)


@triton.jit
def _stage2_backward(
    q_ptr, k_ptr, v_ptr, lam_ptr, g_ptr, gq_ptr, gk_ptr, gv_ptr, glam_ptr,
    sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sg0, sg1, sg2, sg3,
    sgq0, sgq1, sgq2, sgq3,
    heads, rows, n, d,
    JOINT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Writes the query gradient of its row blocks, and its share of the key, value and lambda
    gradients to its own slot of gk/gv/glam (split, batch * heads, ...), summed afterwards in a
    fixed order: deterministic, no atomics."""
    split = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    j = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_D)
    k_pos, k_neg = _streams(k_ptr + b * sk0 + h * sk1, j, c, sk2, sk3, n, d)
    v = _tile(v_ptr + b * sv0 + h * sv1, j, c, sv2, sv3, n, d)
    lam = tl.load(lam_ptr).to(ACC)
    g_kpos = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    g_kneg = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    g_v = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    g_lam = tl.zeros((BLOCK_R,), ACC)
    for start in range(split * BLOCK_R, rows, tl.num_programs(0) * BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        q = _tile(q_ptr + b * sq0 + h * sq1, r, c, sq2, sq3, rows, d)
        g = _tile(g_ptr + b * sg0 + h * sg1, r, c, sg2, sg3, rows, d)
        a_pos, a_neg = _key_stream_maps(q, k_pos, k_neg, j < n, JOINT, ACC)
        g_v += _dot(tl.trans(a_pos - lam * a_neg), g, ACC)
        g_diff = _dot(g, tl.trans(v), ACC)  # dA+ = g_diff, dA- = -lam g_diff
        dot_pos = tl.sum(g_diff * a_pos, 1)
        dot_neg = tl.sum(g_diff * a_neg, 1)
        g_lam -= dot_neg
        if JOINT:  # one normaliser for both streams
            shared = dot_pos - lam * dot_neg
            gs_pos = a_pos * (g_diff - shared[:, None])
            gs_neg = a_neg * (-lam * g_diff - shared[:, None])
        else:
            gs_pos = a_pos * (g_diff - dot_pos[:, None])
            gs_neg = -lam * a_neg * (g_diff - dot_neg[:, None])
        g_q = _dot(gs_pos, k_pos, ACC) + _dot(gs_neg, k_neg, ACC)
        _store(gq_ptr + b * sgq0 + h * sgq1, r, c, sgq2, sgq3, rows, d, g_q)
        g_kpos += _dot(tl.trans(gs_pos), q, ACC)
        g_kneg += _dot(tl.trans(gs_neg), q, ACC)
    slot = split * tl.num_programs(1) + bh
    tile = j[:, None] * BLOCK_D + c[None, :]
    tl.store(gk_ptr + (2 * slot) * BLOCK_N * BLOCK_D + tile, g_kpos)
    tl.store(gk_ptr + (2 * slot + 1) * BLOCK_N * BLOCK_D + tile, g_kneg)
    tl.store(gv_ptr + slot * BLOCK_N * BLOCK_D + tile, g_v)
    tl.store(glam_ptr + slot, tl.sum(g_lam))


@triton.jit
def _online_softmax_step(q, k, v, key_ok, m, l, acc, ACC: tl.constexpr):
    """One block of keys into a stream's running max m, normaliser l and output acc."""
    s = tl.where(key_ok[None, :], _dot(q, tl.trans(k), ACC), float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    return m_new, l * alpha + tl.sum(p, 1), acc * alpha[:, None] + _dot(p, v, ACC)


@triton.jit
def _stage1_forward(
    q_ptr, k_ptr, v_ptr, lam_ptr, out_ptr, stats_ptr,
    sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, so0, so1, so2, so3,
    heads, n, keys, d,
    STATS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """(O+ - lam O-) of one head; with STATS, also each stream's log-normaliser and output into
    stats (batch * heads, 2, BLOCK_N, 1 + BLOCK_D), for the backward."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // heads
    h = bh % heads
    j = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_D)
    q_pos, q_neg = _streams(q_ptr + b * sq0 + h * sq1, j, c, sq2, sq3, n, d)
    m_pos = tl.full((BLOCK_N,), float("-inf"), ACC)
    m_neg = tl.full((BLOCK_N,), float("-inf"), ACC)
    l_pos = tl.zeros((BLOCK_N,), ACC)
    l_neg = tl.zeros((BLOCK_N,), ACC)
    o_pos = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    o_neg = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    for start in range(0, keys, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        k = _tile(k_ptr + b * sk0 + h * sk1, s, c, sk2, sk3, keys, d)
        v = _tile(v_ptr + b * sv0 + h * sv1, s, c, sv2, sv3, keys, d)
        m_pos, l_pos, o_pos = _online_softmax_step(q_pos, k, v, s < keys, m_pos, l_pos, o_pos, ACC)
        m_neg, l_neg, o_neg = _online_softmax_step(q_neg, k, v, s < keys, m_neg, l_neg, o_neg, ACC)
    o_pos = o_pos / l_pos[:, None]
    o_neg = o_neg / l_neg[:, None]
    lam = tl.load(lam_ptr).to(ACC)
    _store(out_ptr + b * so0 + h * so1, j, c, so2, so3, n, d, o_pos - lam * o_neg)
    if STATS:
        stats_pos = stats_ptr + 2 * bh * BLOCK_N * (1 + BLOCK_D)
        stats_neg = stats_pos + BLOCK_N * (1 + BLOCK_D)
        tl.store(stats_pos + j * (1 + BLOCK_D), m_pos + tl.log(l_pos))
        tl.store(stats_neg + j * (1 + BLOCK_D), m_neg + tl.log(l_neg))
        tl.store(stats_pos + j[:, None] * (1 + BLOCK_D) + 1 + c[None, :], o_pos)
        tl.store(stats_neg + j[:, None] * (1 + BLOCK_D) + 1 + c[None, :], o_neg)


@triton.jit
def _stream_map(q, k, lse, key_ok, ACC: tl.constexpr):
    """A block of a stream's map (Stage I), from the forward's log-normalisers."""
    return tl.where(key_ok[None, :], tl.exp(_dot(q, tl.trans(k), ACC) - lse[:, None]), 0)


@triton.jit
def _stage1_backward(
    q_ptr, k_ptr, v_ptr, lam_ptr, g_ptr, stats_ptr, gq_ptr, gk_ptr, gv_ptr, glam_ptr,
    sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sg0, sg1, sg2, sg3,
    heads, n, keys, d,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One head: the key and value gradients block by block, the stream queries' gradient summed
    over the blocks, lambda's from the forward's stream outputs. gq, gk and gv are contiguous."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // heads
    h = bh % heads
    j = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_D)
    q_pos, q_neg = _streams(q_ptr + b * sq0 + h * sq1, j, c, sq2, sq3, n, d)
    lam = tl.load(lam_ptr).to(ACC)
    g_pos = _tile(g_ptr + b * sg0 + h * sg1, j, c, sg2, sg3, n, d).to(ACC)
    g_neg = -lam * g_pos
    stats = stats_ptr + 2 * bh * BLOCK_N * (1 + BLOCK_D)
    lse_pos = tl.load(stats + j * (1 + BLOCK_D))
    lse_neg = tl.load(stats + (BLOCK_N + j) * (1 + BLOCK_D))
    o_pos = tl.load(stats + j[:, None] * (1 + BLOCK_D) + 1 + c[None, :])
    o_neg = tl.load(stats + (BLOCK_N + j[:, None]) * (1 + BLOCK_D) + 1 + c[None, :])
    delta_pos = tl.sum(g_pos * o_pos, 1)  # rowsum(dA * A) = dO . O, per stream
    delta_neg = tl.sum(g_neg * o_neg, 1)
    g_lam = -tl.sum(tl.sum(g_pos * o_neg, 1))
    g_pos = g_pos.to(q_pos.dtype)
    g_neg = g_neg.to(q_pos.dtype)
    gq_pos = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    gq_neg = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    for start in range(0, keys, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        key_ok = s < keys
        k = _tile(k_ptr + b * sk0 + h * sk1, s, c, sk2, sk3, keys, d)
        v = _tile(v_ptr + b * sv0 + h * sv1, s, c, sv2, sv3, keys, d)
        p_pos = _stream_map(q_pos, k, lse_pos, key_ok, ACC)
        p_neg = _stream_map(q_neg, k, lse_neg, key_ok, ACC)
        gs_pos = p_pos * (_dot(g_pos, tl.trans(v), ACC) - delta_pos[:, None])
        gs_neg = p_neg * (_dot(g_neg, tl.trans(v), ACC) - delta_neg[:, None])
        g_v = _dot(tl.trans(p_pos), g_pos, ACC) + _dot(tl.trans(p_neg), g_neg, ACC)
        g_k = _dot(tl.trans(gs_pos), q_pos, ACC) + _dot(tl.trans(gs_neg), q_neg, ACC)
        _store(gv_ptr + bh * keys * d, s, c, d, 1, keys, d, g_v)
        _store(gk_ptr + bh * keys * d, s, c, d, 1, keys, d, g_k)
        gq_pos += _dot(gs_pos, k, ACC)
        gq_neg += _dot(gs_neg, k, ACC)
    _store(gq_ptr + bh * 2 * n * d, j, c, d, 1, n, d, gq_pos)
    _store(gq_ptr + (bh * 2 * n + n) * d, j, c, d, 1, n, d, gq_neg)
    tl.store(glam_ptr + bh, g_lam)


def _block(size: int) -> int:
    """A tile side: a power of two of at least 16, tl.dot's smallest."""
    return max(16, triton.next_power_of_2(size))


def launch_tiles(kernel, n: int, d: int) -> dict:
    """The tile constexprs `kernel` launches with for n tokens per stream and d channels per
    head: the one place that says them, for the launches and for bench.triton_resources."""
    tiles = {"BLOCK_N": _block(n), "BLOCK_D": _block(d)}
    if kernel is _stage2_forward:
        tiles["BLOCK_R"] = BLOCK_ROWS
    elif kernel is _stage2_backward:
        tiles["BLOCK_R"] = BLOCK_ROWS_BACKWARD
    else:
        tiles["BLOCK_S"] = BLOCK_KEYS
    return tiles


def _accumulator(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    """The dtype sums and softmax statistics are kept in: fp32, or fp64 for fp64 operands."""
    wide = torch.promote_types(dtype, torch.float32)
    return wide, tl.float64 if wide == torch.float64 else tl.float32


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


def _launching_on(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the operands' one (under torchrun it
    is already; elsewhere a model may sit on another GPU than the current)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def forward(query, key, value, lam, in_keys: bool, joint: bool, out: torch.Tensor) -> None:
    """stream_difference_op's forward into `out` (see models.attention)."""
    with _launching_on(query):
        _forward(query, key, value, lam, in_keys, joint, out)


def backward(grad, query, key, value, lam, in_keys: bool, joint: bool):
    """Gradients of stream_difference_op for query, key, value and lam."""
    with _launching_on(query):
        return _backward(grad, query, key, value, lam, in_keys, joint)


def _forward(query, key, value, lam, in_keys, joint, out):
    batch, heads, rows, d = query.shape
    _, acc = _accumulator(query.dtype)
    if in_keys:
        n = key.shape[-2] // 2
        tiles = launch_tiles(_stage2_forward, n, d)
        grid = (triton.cdiv(rows, tiles["BLOCK_R"]), batch * heads)
        _stage2_forward[grid](
            query, key, value, lam, out, *_strides(query, key, value, out),
            heads, rows, n, d, JOINT=joint, ACC=acc, **tiles,
            num_warps=NUM_WARPS,
        )  # fmt: skip
    else:
        _stage1(query, key, value, lam, out, None)


def _stage1(query, key, value, lam, out, stats):
    batch, heads, rows, d = query.shape
    _stage1_forward[(batch * heads,)](
        query, key, value, lam, out, stats, *_strides(query, key, value, out),
        heads, rows // 2, key.shape[-2], d, STATS=stats is not None,
        ACC=_accumulator(query.dtype)[1], **launch_tiles(_stage1_forward, rows // 2, d),
        num_warps=NUM_WARPS,
    )  # fmt: skip


def _backward(grad, query, key, value, lam, in_keys, joint):
    batch, heads, rows, d = query.shape
    acc_dtype, acc = _accumulator(query.dtype)
    grad_query = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if in_keys:
        n = key.shape[-2] // 2
        tiles = launch_tiles(_stage2_backward, n, d)  # the slots hold whole tiles
        block_n, block_d = tiles["BLOCK_N"], tiles["BLOCK_D"]
        row_blocks = triton.cdiv(rows, tiles["BLOCK_R"])
        split = max(1, min(row_blocks, PROGRAMS // (batch * heads)))
        grad_key = key.new_empty(split, batch, heads, 2, block_n, block_d, dtype=acc_dtype)
        grad_value = key.new_empty(split, batch, heads, block_n, block_d, dtype=acc_dtype)
        grad_lam = key.new_empty(split, batch * heads, dtype=acc_dtype)
        _stage2_backward[(split, batch * heads)](
            query, key, value, lam, grad, grad_query, grad_key, grad_value, grad_lam,
            *_strides(query, key, value, grad, grad_query),
            heads, rows, n, d, JOINT=joint, ACC=acc, **tiles,
            num_warps=NUM_WARPS,
        )  # fmt: skip
        # contiguous, as the op's fake kernel says: the padded tiles leave strided views
        grad_key = grad_key.sum(0)[..., :n, :d].flatten(2, 3).to(key.dtype).contiguous()
        grad_value = grad_value.sum(0)[..., :n, :d].to(value.dtype).contiguous()
    else:
        n = rows // 2
        tiles = launch_tiles(_stage1_backward, n, d)  # the statistics are laid out by tile
        stats_shape = (batch * heads, 2, tiles["BLOCK_N"], 1 + tiles["BLOCK_D"])
        stats = key.new_empty(stats_shape, dtype=acc_dtype)
        _stage1(query, key, value, lam, torch.empty_like(grad), stats)
        grad_key = torch.empty(key.shape, dtype=key.dtype, device=key.device)
        grad_value = torch.empty(value.shape, dtype=value.dtype, device=value.device)
        grad_lam = key.new_empty(batch * heads, dtype=acc_dtype)
        _stage1_backward[(batch * heads,)](
            query, key, value, lam, grad, stats, grad_query, grad_key, grad_value, grad_lam,
            *_strides(query, key, value, grad),
            heads, n, key.shape[-2], d, ACC=acc, **tiles,
            num_warps=NUM_WARPS,
        )  # fmt: skip
    return grad_query, grad_key, grad_value, grad_lam.sum().to(lam.dtype).reshape(lam.shape)
