"""FID sample sets: their flags and settings, and N images drawn in fixed shards, resumable,
independent of the world size.

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

import argparse
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from common import atomic_write, check_writable, npz_array_info, sweep_leftovers, write_npz
from common.cli import from_flags

from . import dist
from .errors import UsageError
from .sampling import index_labels, sample_batches


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


def shard_is_complete(path: str, count: int) -> bool:
    """Both members' headers say `count` rows. Reads no image data: shards are written
    atomically, so a file that is there with valid headers is whole."""
    try:
        return all(npz_array_info(path, key)[0][:1] == (count,) for key in ("arr_0", "arr_1"))
    except ValueError:  # NpzError included
        return False


def add_sample_set_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sample set")
    g.add_argument("--num-samples", type=int, default=50_000, help="images to draw (default 50000)")
    g.add_argument(
        "--labels",
        choices=["uniform", "balanced"],
        default="uniform",
        help="uniform-random labels keyed to the sample index (DiT/ADM, default) or balanced "
        "(an equal number per class, e.g. 50 x 1000)",
    )
    g.add_argument("--batch-size", type=int, default=32, help="images per forward pass per process")
    g.add_argument(
        "--shard-size",
        type=int,
        default=1000,
        help="images per shard file, the unit of resumption (default 1000)",
    )
    g.add_argument(
        "--sample-dir",
        default=None,
        help="folder for the shards and samples.npz (default: fid-samples/<checkpoint>-<settings>)",
    )


@dataclass(frozen=True)
class SampleSetConfig:
    """A FID sample set: how many images, which labels and seed, and how it is drawn and
    stored (add_sample_set_args's flags); checked when made."""

    num_samples: int = 50_000
    labels: str = "uniform"
    seed: int = 0
    batch_size: int = 32
    shard_size: int = 1000
    sample_dir: str | None = None

    def __post_init__(self):
        for name in ("num_samples", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} must be positive, got {getattr(self, name)}")
        if self.labels not in ("uniform", "balanced"):
            raise UsageError(f"unknown label protocol {self.labels!r}; use uniform or balanced")
        if self.sample_dir:
            check_writable(self.sample_dir, "--sample-dir")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SampleSetConfig":
        return from_flags(cls, args)


def settings_of(loaded, spec, sample_set: SampleSetConfig) -> dict:
    """Everything that changes the sample set, recorded in its folder and the metrics JSON."""
    return {
        "checkpoint": loaded.path,
        "weights": loaded.weights,
        "model": loaded.name,
        "attention": loaded.attention,
        "image_size": loaded.image_size,
        "vae": loaded.vae,
        "num_classes": loaded.num_classes,
        "sampler": spec.describe(),
        "cfg_scale": spec.cfg_scale,
        "cfg_channels": spec.cfg_channels,
        "labels": sample_set.labels,
        "seed": sample_set.seed,
        "precision": loaded.precision,
        "num_samples": sample_set.num_samples,
        "shard_size": sample_set.shard_size,
    }


def default_sample_dir(loaded, spec, sample_set: SampleSetConfig) -> str:
    stem = os.path.splitext(os.path.basename(loaded.path))[0]
    parts = [
        stem,
        loaded.weights,
        spec.method,
        str(spec.steps),
        f"cfg{spec.cfg_scale:g}",
        sample_set.labels,
        f"seed{sample_set.seed}",
        f"n{sample_set.num_samples}",
    ]
    return os.path.join("fid-samples", "-".join(parts))


def draw_sample_set(loaded, spec, sample_set: SampleSetConfig, info) -> tuple[str, dict]:
    """The sample set of `loaded` with sampler `spec`, drawn by every rank and merged by rank 0
    into `samples.npz`; returns its path and settings."""
    objective = loaded.objective_for(spec)
    settings = settings_of(loaded, spec, sample_set)
    folder = sample_set.sample_dir or default_sample_dir(loaded, spec, sample_set)
    check_writable(folder, "--sample-dir")
    if info.is_main:
        write_settings(folder, settings)
        sweep_leftovers(folder)
    dist.barrier()
    num_samples, shard_size, seed = sample_set.num_samples, sample_set.shard_size, sample_set.seed
    missing = missing_shards(folder, num_samples, shard_size)
    todo = [k for k in missing if k % info.world_size == info.rank]  # shard k is rank k's
    bar = tqdm(
        total=sum(_shard_len(k, num_samples, shard_size) for k in todo),
        disable=not info.is_main,
        desc=f"sampling (rank {info.rank})",
        unit="img",
    )
    for shard in todo:
        start = shard * shard_size
        indices = range(start, start + _shard_len(shard, num_samples, shard_size))
        labels = sample_labels(indices, seed, loaded.num_classes, num_samples, sample_set.labels)
        batches = sample_batches(
            loaded.model,
            objective,
            spec,
            loaded.codec,
            labels,
            loaded.latent_shape,
            seed=seed,
            batch_size=sample_set.batch_size,
            first_index=start,
            precision=loaded.precision,
        )
        images = []
        for _, batch, _ in batches:
            images.append(batch)
            bar.update(len(batch))
        with atomic_write(shard_path(folder, shard)) as f:
            np.savez(f, arr_0=np.concatenate(images), arr_1=labels.numpy().astype(np.int64))
    bar.close()
    dist.barrier()
    out = os.path.join(folder, "samples.npz")
    if info.is_main:
        merge_shards(folder, num_samples, shard_size, out)
        print(f"samples: {out}")
    return out, settings


def missing_shards(folder: str, num_samples: int, shard_size: int) -> list[int]:
    """The shards of the set that are not in `folder` whole (written atomically), in order."""
    num_shards = (num_samples + shard_size - 1) // shard_size
    return [
        k
        for k in range(num_shards)
        if not shard_is_complete(shard_path(folder, k), _shard_len(k, num_samples, shard_size))
    ]


def _shard_len(shard: int, num_samples: int, shard_size: int) -> int:
    return min(shard_size, num_samples - shard * shard_size)


def merge_shards(folder: str, num_samples: int, shard_size: int, out_path: str) -> None:
    """Stream every shard into ADM's `samples.npz`, checking count, dtype and completeness."""
    num_shards = (num_samples + shard_size - 1) // shard_size
    missing = missing_shards(folder, num_samples, shard_size)
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
    labels = []
    for k in range(num_shards):
        with np.load(shard_path(folder, k)) as shard:
            labels.append(shard["arr_1"])

    def shard_images():
        for k in range(num_shards):
            with np.load(shard_path(folder, k)) as shard:
                images = shard["arr_0"]
            if images.shape[1:] != (height, width, 3) or images.dtype != np.uint8:
                raise UsageError(f"shard {k} in {folder} has images of another shape")
            yield images

    images = ("arr_0", (num_samples, height, width, 3), np.uint8, shard_images())
    with atomic_write(out_path) as f:
        write_npz(f, {"arr_1": np.concatenate(labels)}, images)


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
    with atomic_write(path, "w") as f:
        json.dump(settings, f, indent=1)
