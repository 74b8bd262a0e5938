"""Class-per-folder image datasets with ADM's centre crop (the DiT/SiT ImageNet preprocessing)."""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from .errors import DataError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's crop: box-halve while that stays >= 2x the target (cheap, alias-free), bicubic-resize
    the short side to image_size, take the centre. Matching it keeps FID comparable."""
    while min(pil_image.size) >= 2 * image_size:
        half = tuple(side // 2 for side in pil_image.size)
        pil_image = pil_image.resize(half, resample=Image.BOX)
    ratio = image_size / min(pil_image.size)
    size = tuple(round(side * ratio) for side in pil_image.size)
    arr = np.asarray(pil_image.resize(size, resample=Image.BICUBIC))
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float32 CHW in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float() / 127.5 - 1


def read_rgb(path: str) -> Image.Image:
    """Decode fully now, so a truncated file fails here with its path, not later in a worker."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path}: {err}; remove or replace the file") from err


class ImageFolderDataset(torch.utils.data.Dataset):
    """root/<class>/**/<image>; labels are the sorted class-folder names (torchvision's order,
    so ImageNet ids match). Hidden folders are skipped. No flip: the training loop flips."""

    def __init__(self, root: str, image_size: int):
        if not os.path.isdir(root):
            raise DataError(f"image folder {root} does not exist; pass --data-path <dir>")
        self.root, self.image_size = root, image_size
        self.classes = sorted(
            e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
        )
        if not self.classes:
            raise DataError(f"{root} has no class folders; expected {root}/<class>/<image files>")
        self.samples = []
        for label, name in enumerate(self.classes):
            files = [
                os.path.join(dirpath, f)
                for dirpath, _, names in sorted(os.walk(os.path.join(root, name), followlinks=True))
                for f in sorted(names)
                if f.lower().endswith(EXTENSIONS)
            ]
            if not files:
                raise DataError(f"class folder {os.path.join(root, name)} has no images")
            self.samples += [(path, label) for path in files]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return to_tensor(center_crop_arr(read_rgb(path), self.image_size)), label

    def verify(self, workers: int = 8) -> None:
        """Decode every file and raise one DataError listing all unreadable ones."""

        def bad(path):
            try:
                read_rgb(path)
            except DataError:
                return path

        with ThreadPoolExecutor(workers) as pool:
            paths = [p for p in pool.map(bad, (p for p, _ in self.samples)) if p]
        if paths:
            raise DataError(
                f"{len(paths)} unreadable image(s) under {self.root}: {', '.join(paths)}"
            )


def iter_folder_images(root: str, image_size: int, batch_size: int):
    """uint8 (B, S, S, 3) batches of every image under `root` (class folders or flat), in sorted
    path order, centre-cropped as in training: the input of reference statistics."""
    if not os.path.isdir(root):
        raise DataError(f"image folder {root} does not exist")
    paths = [
        os.path.join(dirpath, name)
        for dirpath, _, names in sorted(os.walk(root, followlinks=True))
        for name in sorted(names)
        if name.lower().endswith(EXTENSIONS)
    ]
    if not paths:
        raise DataError(f"no images ({', '.join(EXTENSIONS)}) under {root}")
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        yield np.stack([center_crop_arr(read_rgb(p), image_size) for p in chunk])
