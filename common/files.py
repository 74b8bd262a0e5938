"""Atomic writes and the project's cache folder."""

import contextlib
import os
import uuid


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
