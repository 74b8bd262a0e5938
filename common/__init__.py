"""What every layer may use: the project's error base class, atomic file writes, streamed .npz
files and the cache root. It imports nothing from the rest of the project."""

from .errors import InputError, one_line
from .files import atomic_write, cache_root
from .npz import iter_npz_array, npz_array_info, write_npz

__all__ = [
    "InputError",
    "atomic_write",
    "cache_root",
    "iter_npz_array",
    "npz_array_info",
    "one_line",
    "write_npz",
]
