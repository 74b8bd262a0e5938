"""Streaming access to image arrays inside .npz files, in both directions.

`np.load` on an .npz reads a whole member (10k reference images at 256 px are 2 GB, 50k samples
9.8 GB) and ignores `mmap_mode`; these helpers read or write a member's .npy stream in batches,
as ADM's evaluator reads its batches.
"""

import contextlib
import zipfile

import numpy as np
from numpy.lib import format as npy

from .errors import InputError, one_line


class NpzError(InputError):
    """An .npz file that cannot be read as an array file."""


@contextlib.contextmanager
def _open_member(path, key):
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as member:
            yield member
    except KeyError:
        raise NpzError(f"{path} has no array {key!r}: write it with np.savez") from None
    except FileNotFoundError:
        raise NpzError(f"{path} does not exist") from None
    except zipfile.BadZipFile:
        raise NpzError(f"{path} is not an .npz file (the zip of arrays np.savez writes)") from None
    except OSError as error:
        raise NpzError(f"cannot read {path} ({one_line(error)})") from None


def _read_header(member, path, key):
    version = npy.read_magic(member)
    read = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
    if read is None:
        raise NpzError(f"{path}:{key} uses .npy format {version}: rewrite it with np.savez")
    shape, fortran_order, dtype = read(member)
    if fortran_order or dtype.hasobject:
        raise NpzError(f"{path}:{key} is Fortran-ordered or pickled: rewrite it with np.savez")
    return shape, dtype


def npz_array_info(path, key="arr_0"):
    """(shape, dtype) of one member, from its header alone."""
    with _open_member(path, key) as member:
        return _read_header(member, path, key)


def iter_npz_array(path, key="arr_0", batch_size=100):
    """Yield consecutive (<= batch_size, ...) read-only batches of one member of an .npz file."""
    with _open_member(path, key) as member:
        shape, dtype = _read_header(member, path, key)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            rows = min(batch_size, shape[0] - start)
            data = member.read(rows * row_bytes)
            if len(data) != rows * row_bytes:
                raise NpzError(f"{path}:{key} is truncated: rewrite the file")
            yield np.frombuffer(data, dtype=dtype).reshape(rows, *shape[1:])


def write_npz(file, arrays: dict, streamed=None) -> None:
    """Write an uncompressed .npz (as np.savez) into an open binary file.

    `streamed` = (key, shape, dtype, chunks) adds one array whose C-order data comes as an
    iterable of arrays or bytes, so 50,000 images never have to be in memory at once; the bytes
    must add up to `shape`.
    """
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, array in arrays.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                npy.write_array(member, np.asarray(array), allow_pickle=False)
        if streamed is None:
            return
        key, shape, dtype, chunks = streamed
        dtype = np.dtype(dtype)
        header = {"descr": npy.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
        expected, written = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, 0
        with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
            npy.write_array_header_2_0(member, header)
            for chunk in chunks:
                data = chunk if isinstance(chunk, bytes) else np.ascontiguousarray(chunk, dtype)
                written += member.write(memoryview(data).cast("B"))
        if written != expected:
            raise ValueError(f"{key}: {written} bytes streamed for shape {tuple(shape)} {dtype}")
