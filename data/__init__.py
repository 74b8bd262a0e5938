"""Image datasets (ImageFolder with ADM's centre crop, built-in synthetic shapes), latent cache."""

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
    "synthetic_length",
    "center_crop_arr",
    "iter_folder_images",
]


def synthetic_length(data_path: str) -> int | None:
    """N for "synthetic:N" (10000 for "synthetic"), None for any other path (an image folder)."""
    if data_path != "synthetic" and not data_path.startswith("synthetic:"):
        return None
    length = data_path.partition(":")[2] or "10000"
    if not length.isdigit() or int(length) < 1:
        raise DataError(f"bad dataset {data_path!r}; use synthetic or synthetic:N, N >= 1")
    return int(length)


def build_dataset(data_path: str, image_size: int, num_classes: int | None = None):
    """ "synthetic" or "synthetic:N" (N images) -> SyntheticShapes; anything else an image folder.
    A folder with more classes than the model's num_classes is refused up front."""
    length = synthetic_length(data_path)
    if length is not None:
        return SyntheticShapes(image_size, num_classes or 10, length)
    dataset = ImageFolderDataset(data_path, image_size)
    if num_classes is not None and dataset.num_classes > num_classes:
        raise DataError(
            f"{data_path} has {dataset.num_classes} class folders but the model has "
            f"{num_classes} classes; pass --num-classes {dataset.num_classes}"
        )
    return dataset
