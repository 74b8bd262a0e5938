"""Offline evaluation for `make demo`: a small CNN trained on the built-in synthetic shapes.

Inception features mean nothing on 32 px coloured shapes and cannot be downloaded offline, so the
demo scores samples with a classifier trained on `SyntheticShapes` itself: the fraction of samples
recognised as their conditioning class, and a Fréchet distance in its penultimate features.

The classifier tells apart all 100 (shape, colour) styles the dataset can draw, whatever the number
of classes a generator was trained on. A 10-way classifier could name the class from the colour
alone and would accept a red square as the red circle; here that square is class 91, so a sample
counts only if both its shape and its colour are right.
"""

import os
import tempfile
import time

import numpy as np
import torch
from torch import nn

from data.synthetic import COLOURS, SHAPES, SyntheticShapes

from .errors import MetricsError, one_line
from .stats import frechet_distance

STYLES = len(SHAPES) * len(COLOURS)  # every (shape, colour) pair; class c of any dataset is one
VERSION = "v1"  # bump when the architecture or the training recipe changes
TRAIN_SEED = 1  # renders distinct from the generator's data (seed 0) and the reference (seed 2)


class DemoClassifier(nn.Module):
    """Four 3x3 conv blocks, global average pooling, a linear head; `features` is the pooled
    128-d vector, so the distance and the prediction read the same representation."""

    def __init__(self, num_classes: int = STYLES, width: int = 16):
        super().__init__()
        layers, channels = [], 3
        for i in range(4):
            out = width * 2**i
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            layers += [nn.MaxPool2d(2)] if i < 3 else [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            channels = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)
        self.feature_dim = channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.head(features), features


def _to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], as the dataset hands images to the generator."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise MetricsError(
            f"demo scorer takes uint8 (B, H, W, 3) images, got {images.dtype} {images.shape}: "
            "convert with engine.images.to_uint8"
        )
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1


def render(image_size: int, count: int, num_classes: int = STYLES, seed: int = 0):
    """`count` SyntheticShapes images as uint8 NHWC, and their labels (index % num_classes)."""
    data = SyntheticShapes(image_size, num_classes, count, seed)
    labels = np.arange(count) % num_classes
    return np.stack([data.render(i, c) for i, c in enumerate(labels)]), labels


def train(image_size: int, steps: int = 600, batch_size: int = 64, seed: int = TRAIN_SEED):
    """Adam with a one-cycle schedule on freshly drawn images (the renderer's jitter is the
    augmentation); deterministic for a given seed and thread count."""
    torch.manual_seed(seed)
    model = DemoClassifier()
    images, labels = render(image_size, steps * batch_size // 4, seed=seed)
    x, y = _to_input(images), torch.from_numpy(labels)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    order = torch.cat([torch.randperm(len(x)) for _ in range(4)])
    model.train()
    for step in range(steps):
        idx = order[step * batch_size : (step + 1) * batch_size]
        loss = nn.functional.cross_entropy(model(x[idx])[0], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def default_cache_dir() -> str:
    root = os.environ.get("VCA_DIT_CACHE") or os.path.join("~", ".cache", "vca-dit")
    return os.path.join(os.path.expanduser(root), "demo-classifier")


class DemoScorer:
    """uint8 NHWC images -> (logits (B, 100) over all styles, features (B, 128) float64)."""

    def __init__(self, model: DemoClassifier, image_size: int, num_classes: int = 10):
        self.model, self.image_size, self.num_classes = model.eval(), image_size, num_classes

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
        x = _to_input(images)
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise MetricsError(
                f"demo classifier was trained on {self.image_size} px images, got "
                f"{tuple(x.shape[-2:])}: score samples at the training resolution"
            )
        outputs = [self.model(part) for part in x.split(batch_size)]
        logits = torch.cat([o[0] for o in outputs]).double().numpy()
        return logits, torch.cat([o[1] for o in outputs]).double().numpy()


def load_or_train(image_size: int, num_classes: int = 10, cache_dir: str | None = None):
    """A DemoScorer, its weights read from the cache or trained (seconds) and cached atomically;
    an unreadable cache file is retrained over rather than trusted."""
    if not 1 <= num_classes <= STYLES:
        raise MetricsError(f"synthetic data has 1..{STYLES} classes, not {num_classes}")
    folder = cache_dir or default_cache_dir()
    path = os.path.join(folder, f"shapes-{image_size}px-{STYLES}styles-{VERSION}.pt")
    model = DemoClassifier()
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except FileNotFoundError:
        model = _train_and_save(image_size, folder, path)
    except Exception as error:  # truncated or foreign file: say so, then replace it
        print(f"demo classifier cache {path} unreadable ({one_line(error)}); retraining")
        model = _train_and_save(image_size, folder, path)
    return DemoScorer(model, image_size, num_classes)


def _train_and_save(image_size, folder, path):
    start = time.perf_counter()
    model = train(image_size)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"trained demo classifier ({image_size} px) in {time.perf_counter() - start:.0f} s")
    return model
