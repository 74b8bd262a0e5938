"""Reference batches in ADM's .npz layout: validated lazy loading and atomic writing.

Layout (as `VIRTUAL_imagenet256_labeled.npz`): `mu` (2048,), `sigma` (2048, 2048) float64 pool_3
statistics; `mu_s` (2023,), `sigma_s` (2023, 2023) sFID statistics; `arr_0` (N, H, W, 3) uint8,
up to 10,000 images whose features define the reference manifold for precision/recall.
"""

import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from common import atomic_write, iter_npz_array, npz_array_info, one_line, write_npz

from .errors import MetricsError
from .stats import FeatureAccumulator

POOL_DIM = 2048
SPATIAL_DIM = 2023
_ADM_HINT = (
    "use an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) or make one with "
    "evaluate_fid.py --make-ref OUT.npz --images DIR"
)


def progress_bar(iterable, desc, enabled, total=None):
    return tqdm(iterable, desc, total, unit="batch", disable=not enabled, dynamic_ncols=True)


@dataclass
class Reference:
    """Reference statistics; `arr_0` images stay on disk and are streamed by `image_batches`."""

    path: Path
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None  # None: the file has no sFID statistics
    sigma_s: np.ndarray | None
    num_images: int  # images in arr_0; 0 means precision/recall are unavailable

    def image_batches(self, batch_size=100):
        return iter_npz_array(self.path, "arr_0", batch_size)


def _statistic(data, path, key, dim):
    if key not in data.files:
        raise MetricsError(f"reference {path} has no {key!r} (it has {data.files}): {_ADM_HINT}")
    try:
        value = data[key]
    except ValueError:  # numpy's text advises allow_pickle, which would run the file's code
        raise MetricsError(
            f"reference {path}: {key} is a pickled object array, which is never loaded: {_ADM_HINT}"
        ) from None
    expected = (dim,) if key.startswith("mu") else (dim, dim)
    if value.shape != expected or not np.issubdtype(value.dtype, np.floating):
        raise MetricsError(
            f"reference {path}: {key} is {value.dtype} {value.shape}, expected float "
            f"{expected} (TF-Inception statistics): {_ADM_HINT}"
        )
    if not np.isfinite(value).all():
        raise MetricsError(f"reference {path}: {key} has non-finite values: {_ADM_HINT}")
    return value.astype(np.float64)


def load_reference(path):
    """Read and validate a reference .npz; raises MetricsError naming what is wrong.

    Only the statistics are read (np.load opens members on demand; it cannot mmap an .npz), and
    arr_0 only by its header: its images are streamed later by `Reference.image_batches`.
    """
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"reference file {path} does not exist: {_ADM_HINT}")
    try:
        data = np.load(path, allow_pickle=False)
    except OSError as error:
        raise MetricsError(f"cannot read reference {path} ({one_line(error)})") from None
    except (ValueError, EOFError, zipfile.BadZipFile):  # numpy's text advises allow_pickle
        raise MetricsError(f"reference {path} is not an .npz file: {_ADM_HINT}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise MetricsError(f"reference {path} is a single .npy array, not an .npz: {_ADM_HINT}")
    with data:
        mu = _statistic(data, path, "mu", POOL_DIM)
        sigma = _statistic(data, path, "sigma", POOL_DIM)
        mu_s = sigma_s = None
        if "mu_s" in data.files or "sigma_s" in data.files:
            mu_s = _statistic(data, path, "mu_s", SPATIAL_DIM)
            sigma_s = _statistic(data, path, "sigma_s", SPATIAL_DIM)
        has_images = "arr_0" in data.files
    num_images = 0
    if has_images:
        shape, dtype = npz_array_info(path, "arr_0")
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise MetricsError(
                f"reference {path}: arr_0 is {dtype} {shape}, expected uint8 (N, H, W, 3) images"
            )
        num_images = shape[0]
    return Reference(path, mu, sigma, mu_s, sigma_s, num_images)


def _as_numpy(batch):
    return batch.cpu().numpy() if hasattr(batch, "cpu") else np.asarray(batch)


def write_reference(batches, path, extractor, keep_images=10_000, progress=True):
    """Compute a reference file from uint8 NHWC image batches and write it atomically.

    Statistics cover every image; the first `keep_images` images are stored as `arr_0` for
    precision/recall (collected in a temporary file, not in memory). The .npz is assembled
    with `atomic_write`, so a crash never leaves a partial file.
    Returns the written file as a `Reference`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stats = FeatureAccumulator(keep_per_image=False)
    num_kept, image_shape = 0, None
    with tempfile.TemporaryFile(dir=path.parent) as raw:
        for batch in progress_bar(batches, "reference", progress):
            stats.update(extractor(batch))  # validates dtype and shape
            kept = _as_numpy(batch)[: keep_images - num_kept]
            if len(kept) == 0:
                continue
            if image_shape is None:
                image_shape = kept.shape[1:]
            elif kept.shape[1:] != image_shape:
                raise MetricsError(
                    f"reference images change size from {image_shape} to {kept.shape[1:]}: "
                    "resize all images to one resolution"
                )
            raw.write(np.ascontiguousarray(kept).tobytes())
            num_kept += len(kept)
        mu, sigma, mu_s, sigma_s = stats.stats()
        arrays = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
        raw.seek(0)
        chunks = iter(lambda: raw.read(16 << 20), b"")
        images = ("arr_0", (num_kept, *image_shape), np.uint8, chunks) if num_kept else None
        with atomic_write(path) as out:
            write_npz(out, arrays, images)
    return load_reference(path)
