"""Image helpers: model output in [-1, 1] to uint8 (DiT's exact rounding), PNG grids, and the
loss-curve plot, all with numpy and Pillow."""

import numpy as np
import torch
from PIL import Image, ImageDraw

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


def plot_curve(steps, values, path: str, title: str = "loss", size=(640, 400)) -> None:
    """A plain line plot (log-free, min/max labelled) without a plotting dependency."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 20, 30, height - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 8), title, fill="black")
    if len(steps) >= 2:
        lo, hi = float(min(values)), float(max(values))
        hi = hi if hi > lo else lo + 1e-8
        s0, s1 = float(steps[0]), float(steps[-1])
        s1 = s1 if s1 > s0 else s0 + 1
        points = [
            (
                left + (right - left) * (s - s0) / (s1 - s0),
                bottom - (bottom - top) * (v - lo) / (hi - lo),
            )
            for s, v in zip(steps, values, strict=True)
        ]
        draw.line(points, fill=(31, 119, 180), width=2)
        draw.text((4, top - 6), f"{hi:.4g}", fill="black")
        draw.text((4, bottom - 6), f"{lo:.4g}", fill="black")
        draw.text((left, bottom + 8), f"step {int(s0)}", fill="black")
        draw.text((right - 80, bottom + 8), f"step {int(s1)}", fill="black")
    save_png(np.asarray(image), path)
