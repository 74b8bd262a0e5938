"""Token mixers for the DiT backbone: plain MHSA, Visual-Contrast Attention and its ablations,
and Differential Attention.

Every mixer takes and returns (B, N, C) tokens laid out on an H x W grid, owns `qkv` and `proj`
linear layers with the official DiT key names, and calls `F.scaled_dot_product_attention` for
each attention product so fused kernels apply. VCA never forms an N x N map: both of its stages
cost O(N * n * d) per head, n being the number of contrast tokens.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def lambda_init_for(layer_index: int) -> float:
    """Differential Transformer's depth schedule for the initial lambda (0-based block index)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32 so bf16 runs normalise the same way."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """RMSNorm(x) * scale; the scale folds into the weight, saving a pass over x."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = self.weight.to(dtype) * scale
        return F.rms_norm(x.to(dtype), (x.shape[-1],), weight, self.eps).to(x.dtype)


class DiffLambda(nn.Module):
    """lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init: one scalar shared by all heads."""

    def __init__(self, dim: int, lambda_init: float):
        super().__init__()
        self.lambda_init = lambda_init
        self.q1 = nn.Parameter(torch.zeros(dim).normal_(0, 0.1))
        self.k1 = nn.Parameter(torch.zeros(dim).normal_(0, 0.1))
        self.q2 = nn.Parameter(torch.zeros(dim).normal_(0, 0.1))
        self.k2 = nn.Parameter(torch.zeros(dim).normal_(0, 0.1))

    def forward(self) -> torch.Tensor:
        dtype = torch.promote_types(self.q1.dtype, torch.float32)
        q1, k1, q2, k2 = (p.to(dtype) for p in (self.q1, self.k1, self.q2, self.k2))
        return torch.exp(torch.dot(q1, k1)) - torch.exp(torch.dot(q2, k2)) + self.lambda_init


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
        self.lam = DiffLambda(head_dim, lambda_init_for(layer_index))
        self.norm = RMSNorm(2 * head_dim)

    def mix(self, q, k, v) -> torch.Tensor:
        q1, q2 = q.chunk(2, dim=-1)
        k1, k2 = k.chunk(2, dim=-1)
        lam = self.lam().to(v.dtype)
        out = F.scaled_dot_product_attention(q1, k1, v) - lam * F.scaled_dot_product_attention(
            q2, k2, v
        )
        return merge_heads(self.norm(out, 1 - self.lam.lambda_init))


class VisualContrastAttention(Attention):
    """Visual-Contrast Attention (Linear Differential ViT, NeurIPS 2025) and its ablations.

    Contrast tokens: the queries average-pooled from the H x W token grid to h x w (n = h*w),
    plus two learnable embeddings e+ / e- giving a positive and a negative stream.
    Stage I: both streams attend to all N keys; v_hat = (1 - li) RMSNorm(v+ - lambda1 v-).
    Stage II: the N queries attend to the streams (as keys) with values v_hat;
    O = (1 - li) RMSNorm((A+ - lambda2 A-) v_hat), A+/A- two softmaxes over n columns
    (`stage2_softmax="separate"`) or halves of one softmax over 2n (`"joint"`).
    A 3x3 depthwise convolution of v on the grid is added before `proj` (`dwc=True`).

    `variant` picks the ablation: "vca" (full), "stage1" / "stage2" (only that stage is
    differential; the other uses the positive stream alone, with no norm), "emb" (streams are
    e+ / e- alone, no pooled content), "diff" (one set of learnable tokens; each stage is a
    language-style differential attention that splits head channels into two groups).
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
            self.lambda1 = DiffLambda(lam_dim, self.lambda_init)
            self.norm1 = RMSNorm(self.head_dim)
        if self.stage2_diff:
            self.lambda2 = DiffLambda(lam_dim, self.lambda_init)
            self.norm2 = RMSNorm(self.head_dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if dwc else None

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, n, C) -> (B, M, n, d)."""
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _grid(self, t: torch.Tensor) -> torch.Tensor:
        """(B, M, N, d) heads -> (B, C, H, W) image with heads-major channels, as a view when the
        heads come straight from the qkv projection (no copy of N x C)."""
        return t.transpose(1, 2).reshape(t.shape[0], *self.grid_size, -1).permute(0, 3, 1, 2)

    def _streams(self, q: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positive and negative contrast tokens, (B, M, n, d) each (no negative for "diff")."""
        content = 0.0
        if self.variant not in ("emb", "diff"):
            content = F.adaptive_avg_pool2d(self._grid(q), self.contrast_grid)
            content = content.flatten(2).transpose(1, 2).contiguous()  # (B, n, C)

        def stream(embedding):
            return self._heads((content + embedding.to(q.dtype)).expand(B, -1, -1))

        return stream(self.contrast_pos), None if self.contrast_neg is None else stream(
            self.contrast_neg
        )

    def _differential(self, q_a, k_a, q_b, k_b, v, lam_module, norm) -> torch.Tensor:
        """(1 - li) RMSNorm(attn(q_a, k_a, v) - lambda attn(q_b, k_b, v)). lambda multiplies the
        values when they are fewer than the queries (Stage II), else the output (Stage I)."""
        lam = lam_module().to(v.dtype)
        if v.shape[-2] <= q_b.shape[-2]:
            negative = F.scaled_dot_product_attention(q_b, k_b, lam * v)
        else:
            negative = lam * F.scaled_dot_product_attention(q_b, k_b, v)
        out = F.scaled_dot_product_attention(q_a, k_a, v) - negative
        return norm(out, 1 - self.lambda_init)

    def mix(self, q, k, v) -> torch.Tensor:
        pos, neg = self._streams(q, q.shape[0])

        if self.variant == "diff":
            # Split channels: the two groups play the roles of the two streams.
            (t1, t2), (q1, q2), (k1, k2) = pos.chunk(2, -1), q.chunk(2, -1), k.chunk(2, -1)
            v_hat = self._differential(t1, k1, t2, k2, v, self.lambda1, self.norm1)
            out = self._differential(q1, t1, q2, t2, v_hat, self.lambda2, self.norm2)
        else:
            if self.stage1_diff:
                v_hat = self._differential(pos, k, neg, k, v, self.lambda1, self.norm1)
            else:
                v_hat = F.scaled_dot_product_attention(pos, k, v)
            if not self.stage2_diff:
                out = F.scaled_dot_product_attention(q, pos, v_hat)
            elif self.stage2_softmax == "joint":
                lam = self.lambda2().to(v.dtype)
                keys = torch.cat([pos, neg], dim=2)
                values = torch.cat([v_hat, -lam * v_hat], dim=2)
                out = self.norm2(
                    F.scaled_dot_product_attention(q, keys, values), 1 - self.lambda_init
                )
            else:
                out = self._differential(q, pos, q, neg, v_hat, self.lambda2, self.norm2)

        out = merge_heads(out)
        if self.dwc is not None:
            out = out + self._depthwise_conv(v)
        return out

    def _depthwise_conv(self, v: torch.Tensor) -> torch.Tensor:
        """`dwc` (3x3 depthwise, zero padding) of the (B, M, N, d) heads v on the grid, as
        (B, N, C) tokens. Under torch.compile, as nine shifted multiply-adds on (B, H, W, C) that
        inductor fuses: a convolution in the graph turns on inductor's layout optimisation (always
        on CPUs with oneDNN), which stores the 4-D tensors up to the graph's last convolution
        channels-last, the (B, M, N, d) attention tensors of every block included (heads as the
        innermost dim), and the attention kernels become slow strided loops."""
        if not torch.compiler.is_compiling():
            return self.dwc(self._grid(v)).flatten(2).transpose(1, 2)
        (H, W), dtype = self.grid_size, torch.promote_types(v.dtype, torch.float32)
        x = F.pad(merge_heads(v).reshape(v.shape[0], H, W, -1).to(dtype), (0, 0, 1, 1, 1, 1))
        weight, out = self.dwc.weight[:, 0].to(dtype), self.dwc.bias.to(dtype)  # (C, 3, 3), (C,)
        for i in range(3):
            for j in range(3):
                out = out + x[:, i : i + H, j : j + W] * weight[:, i, j]
        return out.flatten(1, 2).to(v.dtype)


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
