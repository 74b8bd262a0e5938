"""Image datasets (ImageFolder with ADM's centre crop, built-in synthetic shapes), latent cache."""

from typing import NamedTuple

from .errors import DataError
from .images import ImageFolderDataset, center_crop_arr, iter_folder_images
from .latent_cache import LatentCacheDataset, build_latent_cache
from .synthetic import SyntheticShapes

__all__ = [
    "DataError",
    "ImageFolderDataset",
    "LatentCacheDataset",
    "SyntheticShapes",
    "build_dataset",
    "build_latent_cache",
    "SyntheticSpec",
    "synthetic_spec",
    "center_crop_arr",
    "iter_folder_images",
]


class SyntheticSpec(NamedTuple):
    length: int
    shape_only: bool


def synthetic_spec(data_path: str) -> SyntheticSpec | None:
    """The built-in shapes named by "synthetic[:N]" (classes are shape x colour pairs) or
    "synthetic-shape[:N]" (classes are shapes, colours random); N defaults to 10000. None for
    any other path (an image folder)."""
    name, colon, length = data_path.partition(":")
    if name not in ("synthetic", "synthetic-shape"):
        return None
    if not colon:
        length = "10000"
    if not length.isdecimal() or int(length) < 1:
        raise DataError(f"bad dataset {data_path!r}; use {name} or {name}:N, N >= 1")
    return SyntheticSpec(int(length), name == "synthetic-shape")


def build_dataset(data_path: str, image_size: int, num_classes: int | None = None):
    """ "synthetic" or "synthetic:N" (N images) -> SyntheticShapes; anything else an image folder.
    A folder with more classes than the model's num_classes is refused up front."""
    synthetic = synthetic_spec(data_path)
    if synthetic is not None and synthetic.shape_only:
        raise DataError(
            f"{data_path}: shape-only classes are for train_classifier.py; generation uses "
            "'synthetic' (shape x colour), the classes evaluate_fid.py --ref synthetic scores"
        )
    if synthetic is not None:
        return SyntheticShapes(image_size, num_classes or 10, synthetic.length)
    dataset = ImageFolderDataset(data_path, image_size)
    if num_classes is not None and dataset.num_classes > num_classes:
        raise DataError(
            f"{data_path} has {dataset.num_classes} class folders but the model has "
            f"{num_classes} classes; pass --num-classes {dataset.num_classes}"
        )
    return dataset
