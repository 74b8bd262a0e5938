"""Atomic writes, the sweep of their leftovers, writability checks, folder locks and the cache
folder."""

import contextlib
import errno
import fcntl
import os
import re
import uuid

from .errors import InputError


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """A file object for `path` that becomes `path` only when the block ends cleanly.

    It writes a temporary file beside `path` (so the rename stays on one filesystem), fsyncs it
    and renames it over `path`: a kill at any moment leaves the old file or the new one, never a
    torn one. On an exception the temporary file is removed and `path` is left as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "x" + mode.replace("w", "")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def cache_root() -> str:
    """$VCA_DIT_CACHE, else ~/.cache/vca-dit: official checkpoints and the demo classifier."""
    root = os.environ.get("VCA_DIT_CACHE") or os.path.join("~", ".cache", "vca-dit")
    return os.path.expanduser(root)


def check_writable(path, flag: str, is_dir: bool = True) -> None:
    """An InputError naming `flag` unless `path` can be written: it is (or can be created as) a
    folder / file, and the nearest existing folder above it may be written in. Creates nothing,
    so a refused command leaves no trace."""
    path = os.path.abspath(os.fspath(path))
    kind = "folder" if is_dir else "file"
    if os.path.exists(path):
        if is_dir != os.path.isdir(path):
            raise InputError(f"{flag} {path} exists and is not a {kind}")
        target = path if is_dir else os.path.dirname(path)
    else:
        target = os.path.dirname(path)
        while not os.path.exists(target):
            target = os.path.dirname(target)
        if not os.path.isdir(target):
            raise InputError(f"{flag} {path}: {target} is a file, so the {kind} cannot be made")
    if not os.access(target, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: {target} is not writable")


# What atomic_write leaves when killed (and the ".tmp-*" files of earlier versions).
LEFTOVER = re.compile(r"^(\..+\.[0-9a-f]{12}\.tmp|\.tmp-.+)$")


def sweep_leftovers(folder, prefix: str = "") -> list[str]:
    """Remove the temporary files that killed atomic_writes of files named `prefix`... left in
    `folder`; returns their names. Call it where no other process writes such files."""
    if not os.path.isdir(folder):
        return []
    removed = sorted(
        name
        for name in os.listdir(folder)
        if LEFTOVER.match(name) and (name.startswith("." + prefix) or not prefix)
    )
    for name in removed:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
    return removed


def lock_folder(path) -> object | None:
    """An exclusive lock on the folder `path` (made if missing), held while the returned file
    stays open. A POSIX record lock: the OS drops it when the process ends, even by kill -9, so
    a crashed run leaves no stale lock, and forked children (DataLoader workers) do not inherit
    it. None where the file system keeps no locks. Raises BlockingIOError while another process
    holds it."""
    os.makedirs(path, exist_ok=True)
    try:
        handle = open(os.path.join(path, ".lock"), "a")  # noqa: SIM115 (held past the return)
    except OSError as err:
        raise InputError(f"cannot create a lock file in {path}: {err.strerror}") from None
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.close()
        if err.errno in (errno.EACCES, errno.EAGAIN):
            raise BlockingIOError(err.errno, f"{path} is locked") from None
        return None
    return handle
