"""Image helpers: model output in [-1, 1] to uint8 (DiT's exact rounding), PNG grids and
atomic PNG writes, with numpy and Pillow."""

import numpy as np
import torch
from PIL import Image

from common import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 as DiT converts for FID:
    clamp(127.5 x + 128, 0, 255), truncated."""
    x = torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, nrow: int, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """(B, H, W, 3) uint8 -> one (rows*(H+p)+p, nrow*(W+p)+p, 3) image, row-major order."""
    count, h, w, c = images.shape
    nrow = max(1, min(nrow, count))
    rows = (count + nrow - 1) // nrow
    grid = np.full(
        (rows * (h + padding) + padding, nrow * (w + padding) + padding, c),
        pad_value,
        dtype=np.uint8,
    )
    for i, image in enumerate(images):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


def save_png(array: np.ndarray, path: str) -> None:
    """Write atomically so a viewer (or a killed run) never sees half a PNG."""
    with atomic_write(path) as f:
        Image.fromarray(array).save(f, format="PNG")
