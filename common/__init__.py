"""What every layer may use: the project's error base class, atomic file writes, streamed .npz
files and the cache root. It imports nothing from the rest of the project."""

from .errors import InputError, one_line, safe_load_failure
from .files import atomic_write, cache_root, check_writable, lock_folder, sweep_leftovers
from .npz import iter_npz_array, npz_array_info, write_npz

__all__ = [
    "InputError",
    "atomic_write",
    "cache_root",
    "check_writable",
    "iter_npz_array",
    "lock_folder",
    "npz_array_info",
    "one_line",
    "safe_load_failure",
    "sweep_leftovers",
    "write_npz",
]
