"""Checkpoint files: where they are (official names, their download and cache folder), how they
are written (atomically) and read (`weights_only=True`, so no pickle code ever runs on load).

Training checkpoints hold {"model", "ema", "opt", "step", "epoch", "batch_in_epoch",
"world_size", "rng", "config"}, "config" being {"model", "objective", "train"}: the dicts of
ModelConfig, ObjectiveConfig and TrainConfig. Checkpoints from before the configs hold "args"
(train.py's flags as a flat dict) instead, and still load and resume.
"""

import os
import re
import sys

import torch

from common import atomic_write, cache_root, one_line, safe_load_failure

from .errors import UsageError

CHECKPOINT_NAME = re.compile(r"^(\d{7,})\.pt$")
DIT_URL = "https://dl.fbaipublicfiles.com/DiT/models/{}"
# SiT's URL is the one in its repository's download.py (willisma/SiT).
OFFICIAL_URLS = {
    "DiT-XL-2-256x256.pt": DIT_URL.format("DiT-XL-2-256x256.pt"),
    "DiT-XL-2-512x512.pt": DIT_URL.format("DiT-XL-2-512x512.pt"),
    "SiT-XL-2-256.pt": "https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/"
    "SiT-XL-2-256.pt?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0",
}


def default_cache_dir() -> str:
    """$VCA_DIT_CACHE (the project's cache root, default ~/.cache/vca-dit) + /checkpoints."""
    return os.path.join(cache_root(), "checkpoints")


def resolve_checkpoint(name_or_path: str, cache_dir: str) -> str:
    """An existing file as is; an official name from `cache_dir`, downloaded there if missing."""
    path = os.path.expanduser(name_or_path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        found = list_checkpoints(path) or list_checkpoints(os.path.join(path, "checkpoints"))
        newest = f", e.g. its newest, {found[-1][1]}" if found else ""
        raise UsageError(
            f"checkpoint {name_or_path!r} is a directory, not a checkpoint file; pass a "
            f"checkpoint file{newest}"
        )
    if name_or_path not in OFFICIAL_URLS:
        raise UsageError(
            f"checkpoint {name_or_path!r} does not exist; pass a checkpoint file or one of the "
            f"official names {', '.join(OFFICIAL_URLS)}"
        )
    cached = os.path.join(cache_dir, name_or_path)
    if os.path.isfile(cached):
        return cached
    url = OFFICIAL_URLS[name_or_path]
    try:  # into atomic_write's temporary file (by its name), renamed to `cached` when whole
        with atomic_write(cached) as partial:
            torch.hub.download_url_to_file(url, partial.name, progress=sys.stderr.isatty())
    except Exception as err:
        raise UsageError(
            f"{name_or_path} is not in {cache_dir} and downloading it failed ({one_line(err)}); "
            f"download {url} on a machine with network and put it at {cached}"
        ) from err
    return cached


def save_checkpoint(state: dict, path: str) -> None:
    """Atomic: a kill at any moment leaves either the old file or the new one."""
    with atomic_write(path) as f:
        torch.save(state, f)


def save_training_checkpoint(path: str, train_step, position: dict, configs: dict) -> None:
    """The training state of `train_step` (model, EMA, optimizer, loss scaler), the loop's
    `position` (step, epoch, batch_in_epoch, world_size) and the run's `configs`."""
    state = {
        "model": train_step.model.state_dict(),
        "ema": train_step.ema.state_dict(),
        "opt": train_step.optimizer.state_dict(),
        **position,
        "config": configs,
        "rng": {"torch": torch.get_rng_state()},
    }
    if train_step.scaler.is_enabled():
        state["scaler"] = train_step.scaler.state_dict()
    save_checkpoint(state, path)


def check_resumable(path: str, state: dict, model_config, run: dict) -> None:
    """A UsageError unless the checkpoint `state` (read from `path`) holds the network of
    `model_config`, trained at `run`'s image_size and vae."""
    saved = stored_config(state)
    current = model_config.to_dict()
    stored = {key: saved["model"].get(key, value) for key, value in current.items()}
    if stored["learn_sigma"] is None:  # older checkpoints: the family's default
        stored["learn_sigma"] = current["learn_sigma"]
    mismatched = [
        (key, stored[key], current[key]) for key in current if stored[key] != current[key]
    ]
    mismatched += [
        (key, saved["train"][key], value)
        for key, value in run.items()
        if key in saved["train"] and saved["train"][key] != value
    ]
    if mismatched:
        detail = ", ".join(f"{key}: checkpoint {a!r} vs now {b!r}" for key, a, b in mismatched)
        raise UsageError(f"cannot resume {path}: it is from a different model ({detail})")


def restore_training_state(path: str, state: dict, train_step) -> dict:
    """Load a checked training checkpoint `state` into `train_step`; returns the loop's
    position."""
    try:
        train_step.model.load_state_dict(state["model"])
        train_step.ema.load_state_dict(state["ema"])
        train_step.optimizer.load_state_dict(state["opt"])
    except (KeyError, RuntimeError) as err:
        raise UsageError(f"cannot resume {path}: {one_line(err)}") from err
    if "scaler" in state and train_step.scaler.is_enabled():
        train_step.scaler.load_state_dict(state["scaler"])
    return {
        key: state[key] for key in ("step", "epoch", "batch_in_epoch", "world_size") if key in state
    }


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint on the CPU with `weights_only=True`; bad files are a UsageError."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"cannot read checkpoint {path!r}: {safe_load_failure(err)}") from err


def checkpoint_path(folder: str, step: int) -> str:
    return os.path.join(folder, f"{step:07d}.pt")


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """(step, path) of the finished checkpoints in `folder`, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = CHECKPOINT_NAME.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


def loads(path: str) -> bool:
    """Whether a checkpoint file reads (memory-mapped, so only its index is touched)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return True
    except Exception:
        return False


def latest_checkpoint(folder: str) -> str | None:
    """The newest checkpoint that loads; a damaged newest file falls back to the one before."""
    return next((path for _, path in reversed(list_checkpoints(folder)) if loads(path)), None)


def prune_checkpoints(folder: str, keep: int) -> None:
    """Keep the `keep` newest checkpoints that load (0 keeps all) and delete the rest,
    unreadable ones included: a damaged file never takes the place of a good one."""
    if keep <= 0:
        return
    found = list_checkpoints(folder)
    kept = [path for _, path in found if loads(path)][-keep:]
    for _, path in found:
        if path not in kept:
            os.remove(path)


def checkpoint_to_resume(folder: str, resume: str | None) -> str | None:
    """The checkpoint a run starts from: None (fresh), the newest loadable one in `folder` for
    "auto", or the file given. A fresh run in a folder that holds another run's checkpoints, and
    "auto" where none of them loads, are UsageErrors: the new run's pruning would delete them,
    and a fresh start would overwrite them."""
    found = list_checkpoints(folder)
    if resume is None:
        if found:
            raise UsageError(
                f"{folder} holds checkpoints of an earlier run (the newest is {found[-1][1]}); "
                "pass --resume to continue it, or give another --results-dir"
            )
        return None
    if resume == "auto":
        path = latest_checkpoint(folder)
        if found and path is None:
            raise UsageError(
                f"none of the {len(found)} checkpoints in {folder} can be read; move them away "
                "to start afresh, or pass --resume PATH to a good copy"
            )
        return path
    if os.path.isdir(resume):
        raise UsageError(
            f"--resume {resume} is a folder; pass a checkpoint file in it, or "
            f"--results-dir {resume} --resume to take its newest"
        )
    if not os.path.isfile(resume):
        raise UsageError(f"--resume {resume}: no such checkpoint file")
    return resume


def stored_config(saved: dict) -> dict:
    """{"model", "objective", "train"} config dicts of a checkpoint (or safetensors metadata):
    its "config", or, for files from before the configs, its flat train.py "args" read as all
    three (each config takes the keys it knows; train.py's --model is ModelConfig's name)."""
    config = saved.get("config")
    if isinstance(config, dict):
        return {key: config.get(key) or {} for key in ("model", "objective", "train")}
    args = saved.get("args")
    if not isinstance(args, dict):
        return {"model": {}, "objective": {}, "train": {}}
    model = {("name" if key == "model" else key): value for key, value in args.items()}
    return {"model": model, "objective": args, "train": args}
