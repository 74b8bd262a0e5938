"""common/: atomic writes, streamed .npz files and the error base class every layer shares."""

import json
import os

import numpy as np
import pytest

from common import InputError, atomic_write, iter_npz_array, npz_array_info, write_npz
from common.npz import NpzError
from data import DataError
from engine.errors import UsageError
from metrics import MetricsError
from models import ConfigError
from models.codec import CodecError


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "out.json"
    with atomic_write(path, "w") as f:
        json.dump({"a": 1}, f)
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError, match="killed"), atomic_write(path, "w") as f:
        f.write('{"a": 2, "half')
        raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"a": 1}  # the old file, untouched
    assert os.listdir(tmp_path / "sub") == ["out.json"]  # no temporary file left behind
    with atomic_write(path) as f:
        f.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0o600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_npz_streams_a_member_that_np_load_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 4, 5, 3), dtype=np.uint8)
    labels = np.arange(10)
    chunks = [images[:3], images[3:4].tobytes(), images[4:]]  # arrays and raw bytes alike
    path = tmp_path / "s.npz"
    with atomic_write(path) as f:
        write_npz(f, {"arr_1": labels}, ("arr_0", images.shape, np.uint8, chunks))
    with np.load(path) as data:
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], labels)
    assert npz_array_info(path) == (images.shape, np.dtype(np.uint8))
    np.testing.assert_array_equal(np.concatenate(list(iter_npz_array(path, batch_size=4))), images)
    with pytest.raises(ValueError, match="bytes streamed"), atomic_write(path) as f:
        write_npz(f, {}, ("arr_0", (11, 4, 5, 3), np.uint8, [images]))  # one image short
    with np.load(path) as data:  # the earlier file survives
        np.testing.assert_array_equal(data["arr_0"], images)


def test_every_layer_error_is_an_input_error(tmp_path):
    """Each script catches InputError once; a layer's own class must be one."""
    for error in (UsageError, ConfigError, DataError, CodecError, MetricsError, NpzError):
        assert issubclass(error, InputError)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="is not an .npz file"):
        npz_array_info(tmp_path / "bad.npz")
