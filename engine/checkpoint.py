"""Training checkpoints: one dict, written atomically, loadable with `weights_only=True`.

Layout: {"model", "ema", "opt", "step", "epoch", "batch_in_epoch", "args", "rng", "world_size"};
"args" holds plain types only, so no pickle code ever runs on load.
"""

import os
import re
import tempfile

import torch

from .errors import UsageError

CHECKPOINT_NAME = re.compile(r"^(\d{7,})\.pt$")


def save_checkpoint(state: dict, path: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`, so a kill at
    any moment leaves either the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint on the CPU with `weights_only=True`; bad files are a UsageError."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot read checkpoint {path!r}: {first_line}") from err


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


def latest_checkpoint(folder: str) -> str | None:
    """The newest checkpoint that loads; a damaged newest file falls back to the one before."""
    for _, path in reversed(list_checkpoints(folder)):
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return path
        except Exception:
            continue
    return None


def prune_checkpoints(folder: str, keep: int) -> None:
    """Keep the `keep` newest checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(folder)[:-keep]:
        os.remove(path)
