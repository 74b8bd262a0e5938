"""Offline evaluation for `make demo`: a small CNN trained on the built-in synthetic shapes.

Inception features mean nothing on 32 px coloured shapes and cannot be downloaded offline, so the
demo scores samples with a classifier trained on `SyntheticShapes` itself: the fraction of samples
recognised as their conditioning class, and a Fréchet distance in its penultimate features.

The classifier tells apart all 100 (shape, colour) styles the dataset can draw, whatever the number
of classes a generator was trained on. A 10-way classifier could name the class from the colour
alone and would accept a red square as the red circle; here that square is class 91, so a sample
counts only if both its shape and its colour are right.
"""

import contextlib
import os
import time

import numpy as np
import torch
from torch import nn

from common import atomic_write, cache_root, one_line
from data.synthetic import COLOURS, SHAPES, SyntheticShapes

from .errors import MetricsError
from .stats import frechet_distance

STYLES = len(SHAPES) * len(COLOURS)  # every (shape, colour) pair; class c of any dataset is one
VERSION = "v1"  # bump when the architecture or the training recipe changes
TRAIN_SEED = 1  # renders distinct from the generator's data (seed 0) and the reference (seed 2)


class DemoClassifier(nn.Module):
    """A strided stem, three 3x3 conv blocks (two max-pooled), global average pooling and a
    linear head over the 100 styles; `features` is the pooled 128-d vector the head reads."""

    def __init__(self, image_size: int, width: int = 16):
        super().__init__()
        stride = max(1, image_size // 16)  # the stem brings any size to about 16 px
        layers, channels = [], 3
        for i in range(4):
            out = width * 2**i
            conv = (
                nn.Conv2d(3, out, 2 * stride + 1, stride, padding=stride)
                if i == 0
                else nn.Conv2d(channels, out, 3, padding=1)
            )
            layers += [conv, nn.BatchNorm2d(out), nn.ReLU()]
            layers += [nn.MaxPool2d(2)] if i in (1, 2) else []
            channels = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, STYLES)

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
    x = torch.tensor(images).permute(0, 3, 1, 2)  # a copy: npz batches are read-only
    return x.float() / 127.5 - 1


def render(image_size: int, count: int, num_classes: int = STYLES, seed: int = 0):
    """`count` SyntheticShapes images as uint8 NHWC, and their labels (index % num_classes)."""
    data = SyntheticShapes(image_size, num_classes, count, seed)
    labels = np.arange(count) % num_classes
    return np.stack([data.render(i, c) for i, c in enumerate(labels)]), labels


@contextlib.contextmanager
def _one_thread():
    """Convolutions this small gain little from threads and lose badly to a busy CPU (2 threads
    ran 10x slower than 1 beside other jobs); one thread also makes training reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@_one_thread()
def train(image_size: int, steps: int = 350, batch_size: int = 64, seed: int = TRAIN_SEED):
    """Adam with a one-cycle schedule, four passes over freshly rendered images (the renderer's
    jitter of position, size, angle, colour and background is the augmentation)."""
    torch.manual_seed(seed)
    model = DemoClassifier(image_size)
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
    return os.path.join(cache_root(), "demo-classifier")


class DemoScorer:
    """uint8 NHWC images -> (logits (B, 100) over all styles, features (B, 128) float64)."""

    def __init__(self, model: DemoClassifier, image_size: int, num_classes: int = 10):
        self.model, self.image_size, self.num_classes = model.eval(), image_size, num_classes

    @torch.no_grad()
    @_one_thread()
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
    model = DemoClassifier(image_size)
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
    with atomic_write(path) as f:
        torch.save(model.state_dict(), f)
    print(f"trained demo classifier ({image_size} px) in {time.perf_counter() - start:.0f} s")
    return model


def demo_metrics(
    batches, scorer: DemoScorer, num_reference: int = 2000, seed: int = 2, bootstrap: int = 200
) -> dict:
    """Score samples against the classes they were conditioned on.

    `batches` yields (images, labels): uint8 (B, H, W, 3) samples and the class each was drawn
    for. `class_accuracy` is the fraction whose predicted style is that class; `frechet_distance`
    compares their features with `num_reference` real images rendered with `seed` (a set neither
    the generator, seed 0, nor the classifier, seed 1, trained on), whose own accuracy is
    `real_accuracy`: the ceiling a perfect generator would reach.

    The `*_bootstrap_se` entries are the evaluation's own noise: the standard deviation of each
    metric over `bootstrap` resamplings of the samples with replacement (the reference fixed),
    which is how far a second draw of as many samples from the same checkpoint would move it.
    """
    correct, features = [], []
    for images, labels in batches:
        logits, feats = scorer(images)
        labels = np.asarray(labels)
        if labels.shape != (len(logits),):
            raise MetricsError(f"{len(logits)} images but labels of shape {labels.shape}")
        correct.append(logits.argmax(1) == labels)
        features.append(feats)
    features = np.concatenate(features) if features else np.empty((0, 0))
    if len(features) < 2:
        raise MetricsError(f"demo metrics need at least 2 samples, got {len(features)}")
    correct = np.concatenate(correct)
    images, labels = render(scorer.image_size, num_reference, scorer.num_classes, seed)
    real_logits, real_features = scorer(images)
    real_stats = real_features.mean(0), np.cov(real_features, rowvar=False)

    def distance(feats):
        return frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), *real_stats)

    draws = np.random.default_rng(seed).integers(0, len(features), (bootstrap, len(features)))
    return {
        "class_accuracy": float(correct.mean()),
        "frechet_distance": distance(features),
        "num_samples": len(features),
        "real_accuracy": float((real_logits.argmax(1) == labels).mean()),
        "class_accuracy_bootstrap_se": float(np.std([correct[i].mean() for i in draws], ddof=1)),
        "frechet_distance_bootstrap_se": float(
            np.std([distance(features[i]) for i in draws], ddof=1)
        ),
    }
