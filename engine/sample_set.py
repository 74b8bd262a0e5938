"""FID sample sets: N images drawn in fixed shards, resumable, independent of the world size.

Sample i gets its noise from (seed, i) and its label from (seed, i) or a seeded balanced
permutation, so any number of processes, in any order, with restarts, produce one set.
Shard k holds indices [k*S, (k+1)*S) and is written atomically, so a killed run loses at most
the shards in flight; a rerun generates only the missing ones. The stochastic samplers (DDPM,
SDE) draw each sample's per-step noise from its own generator, so the batch size does not
matter either, except for the adaptive ODE solver (dopri5), whose steps follow the error of the
whole batch: keep `--batch-size` fixed across reruns with it, or use a fixed-step ODE method.

The merged `samples.npz` is ADM's layout: `arr_0` uint8 (N, H, W, 3), `arr_1` int64 labels,
streamed into an uncompressed zip so 50,000 images at 256 px never sit in memory at once.
"""

import json
import os
import tempfile
import zipfile

import numpy as np
import torch
from tqdm import tqdm

from metrics.errors import MetricsError
from metrics.npz import npz_array_info

from .errors import UsageError
from .images import to_uint8
from .sampling import generate, index_generators, index_labels, index_noise


def sample_labels(indices, seed: int, num_classes: int, num_samples: int, protocol: str):
    """'uniform': i.i.d. uniform labels keyed to the index (DiT/ADM); 'balanced': a seeded
    permutation of an equal number of each class (50 per class for 50k over 1000)."""
    if protocol == "uniform":
        return index_labels(indices, seed, num_classes)
    if protocol == "balanced":
        if num_samples % num_classes:
            raise UsageError(
                f"--labels balanced needs --num-samples ({num_samples}) to be a multiple of "
                f"the {num_classes} classes"
            )
        balanced = np.arange(num_samples) % num_classes
        order = np.random.default_rng([seed, num_samples, num_classes]).permutation(balanced)
        return torch.as_tensor(order[np.asarray(list(indices))], dtype=torch.long)
    raise UsageError(f"unknown label protocol {protocol!r}; use uniform or balanced")


def shard_path(folder: str, shard: int) -> str:
    return os.path.join(folder, f"shard-{shard:05d}.npz")


def _atomic_savez(path: str, **arrays):
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=os.path.dirname(path))
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_is_complete(path: str, count: int) -> bool:
    """Both members' headers say `count` rows. Reads no image data: shards are written
    atomically, so a file that is there with valid headers is whole."""
    try:
        return all(npz_array_info(path, key)[0][:1] == (count,) for key in ("arr_0", "arr_1"))
    except (MetricsError, ValueError):
        return False


def generate_sample_set(
    loaded,
    objective,
    spec,
    codec,
    folder: str,
    *,
    num_samples: int,
    seed: int,
    labels: str,
    cfg_scale: float,
    cfg_channels,
    precision: str,
    batch_size: int,
    shard_size: int,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> int:
    """Draw this rank's missing shards into `folder`; returns how many shards it generated."""
    os.makedirs(folder, exist_ok=True)
    num_shards = (num_samples + shard_size - 1) // shard_size
    mine = [k for k in range(rank, num_shards, world_size)]
    todo = [
        k
        for k in mine
        if not shard_is_complete(shard_path(folder, k), _shard_len(k, num_samples, shard_size))
    ]
    latent = loaded.image_size // codec.downsample
    shape = (codec.latent_channels, latent, latent)
    bar = tqdm(
        total=sum(_shard_len(k, num_samples, shard_size) for k in todo),
        disable=not progress,
        desc=f"sampling (rank {rank})",
        unit="img",
    )
    for shard in todo:
        start = shard * shard_size
        stop = min(start + shard_size, num_samples)
        images, shard_labels = [], []
        for lo in range(start, stop, batch_size):
            indices = range(lo, min(lo + batch_size, stop))
            y = sample_labels(indices, seed, loaded.num_classes, num_samples, labels)
            noise = index_noise(indices, seed, shape)
            out = generate(
                loaded.model,
                objective,
                spec,
                codec,
                y,
                noise,
                cfg_scale=cfg_scale,
                cfg_channels=cfg_channels,
                generator=index_generators(indices, seed),
                precision=precision,
            )
            images.append(to_uint8(out))
            shard_labels.append(y.numpy())
            bar.update(len(indices))
        _atomic_savez(
            shard_path(folder, shard),
            arr_0=np.concatenate(images),
            arr_1=np.concatenate(shard_labels).astype(np.int64),
        )
    bar.close()
    return len(todo)


def _shard_len(shard: int, num_samples: int, shard_size: int) -> int:
    return min(shard_size, num_samples - shard * shard_size)


def merge_shards(folder: str, num_samples: int, shard_size: int, out_path: str) -> None:
    """Stream every shard into ADM's `samples.npz`, checking count, dtype and completeness."""
    num_shards = (num_samples + shard_size - 1) // shard_size
    missing = [
        k
        for k in range(num_shards)
        if not shard_is_complete(shard_path(folder, k), _shard_len(k, num_samples, shard_size))
    ]
    if missing:
        raise UsageError(
            f"{len(missing)} of {num_shards} shards in {folder} are missing or "
            "incomplete; rerun the same command to generate them"
        )
    with np.load(shard_path(folder, 0)) as first:
        height, width, channels = first["arr_0"].shape[1:]
        dtype = first["arr_0"].dtype
    if dtype != np.uint8 or channels != 3:
        raise UsageError(f"shards in {folder} hold {dtype} images with {channels} channels")
    fd, tmp = tempfile.mkstemp(
        prefix=".tmp-", suffix=".npz", dir=os.path.dirname(os.path.abspath(out_path))
    )
    os.close(fd)
    labels = []
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            header = {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                "fortran_order": False,
                "shape": (num_samples, height, width, 3),
            }
            np.lib.format.write_array_header_2_0(member, header)
            for k in range(num_shards):
                with np.load(shard_path(folder, k)) as shard:
                    images = shard["arr_0"]
                    if images.shape[1:] != (height, width, 3) or images.dtype != np.uint8:
                        raise UsageError(f"shard {k} in {folder} has images of another shape")
                    member.write(np.ascontiguousarray(images).tobytes())
                    labels.append(shard["arr_1"])
        with archive.open("arr_1.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.concatenate(labels))
    os.replace(tmp, out_path)


def write_settings(folder: str, settings: dict) -> None:
    """Refuse to mix shards drawn with other settings into one set."""
    path = os.path.join(folder, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        changed = sorted(k for k in settings if previous.get(k) != settings[k])
        if changed:
            raise UsageError(
                f"{folder} holds samples drawn with other settings ({', '.join(changed)}); "
                "use another --sample-dir or delete it"
            )
        return
    os.makedirs(folder, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(settings, f, indent=1)
    os.replace(path + ".tmp", path)
