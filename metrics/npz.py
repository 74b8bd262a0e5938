"""Streaming access to image arrays inside .npz files, in both directions.

`np.load` on an .npz reads a whole member (10k reference images at 256 px are 2 GB, 50k samples
9.8 GB) and ignores `mmap_mode`; these helpers read or write a member's .npy stream in batches,
as ADM's evaluator reads its batches.
"""

import contextlib
import shutil
import zipfile

import numpy as np
from numpy.lib import format as npy

from .errors import MetricsError, one_line


@contextlib.contextmanager
def _open_member(path, key):
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as member:
            yield member
    except KeyError:
        raise MetricsError(f"{path} has no array {key!r}: write it with np.savez") from None
    except (zipfile.BadZipFile, OSError) as error:
        reason = one_line(error)
        raise MetricsError(f"{path} is not a readable .npz file ({reason}): rewrite it") from None


def _read_header(member, path, key):
    version = npy.read_magic(member)
    read = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
    if read is None:
        raise MetricsError(f"{path}:{key} uses .npy format {version}: rewrite it with np.savez")
    shape, fortran_order, dtype = read(member)
    if fortran_order or dtype.hasobject:
        raise MetricsError(f"{path}:{key} is Fortran-ordered or pickled: rewrite it with np.savez")
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
                raise MetricsError(f"{path}:{key} is truncated: rewrite the file")
            yield np.frombuffer(data, dtype=dtype).reshape(rows, *shape[1:])


def write_npz(path, arrays, raw_member=None):
    """Write an uncompressed .npz (as np.savez) to `path`.

    `raw_member` = (key, shape, dtype, raw_file) appends one array whose C-order bytes are copied
    from an open binary file, so an image array collected on disk never has to be in memory.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, array in arrays.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                npy.write_array(member, np.asarray(array), allow_pickle=False)
        if raw_member is not None:
            key, shape, dtype, raw_file = raw_member
            header = {"descr": npy.dtype_to_descr(np.dtype(dtype)), "fortran_order": False}
            with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                npy.write_array_header_1_0(member, {**header, "shape": tuple(shape)})
                raw_file.seek(0)
                shutil.copyfileobj(raw_file, member, length=16 << 20)
