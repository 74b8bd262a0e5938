"""TF-compatible Inception-v3 features (torch-fidelity's `inception-v3-compat`) as ADM uses them.

ADM's evaluator reads three things from the 2015 TF Inception graph: `pool_3` (2048-d, FID and
precision/recall), `mixed_6/conv` (the Mixed_6d 1x1 branch; its first 7 channels on the 17x17 grid
give sFID) and a bias-free 1008-way softmax over `pool_3` (Inception Score). torch-fidelity's port
gives `2048` and `logits_unbiased` directly; the spatial map is taken with a forward hook.
"""

import contextlib
from pathlib import Path

import numpy as np
import torch
from torch_fidelity import feature_extractor_inceptionv3 as tfi

from common import one_line, safe_load_failure

from .errors import MetricsError

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = tfi.URL_INCEPTION_V3
SPATIAL_CHANNELS = 7


@contextlib.contextmanager
def tf32_disabled():
    """Run in true fp32: TF32 matmuls/convolutions shift FID by more than ADM-parity tolerates."""
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _downloaded_weights() -> Path:
    """torch-fidelity's own copy of the weights, in torch.hub's checkpoint folder (where its
    download keeps it), downloaded there first if missing: so that, like a user's file, it is
    checked before torch-fidelity loads it."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(WEIGHTS_URL, str(path))  # via a temporary file
        except OSError as error:  # urllib's URLError included
            raise MetricsError(
                f"could not download the Inception weights ({one_line(error)}): on an offline "
                f"machine pass --inception-weights PATH to a copy of {WEIGHTS_FILE} ({WEIGHTS_URL})"
            ) from None
    return path


def _check_weights_file(path):
    """Refuse a missing file, or one that is not a plain tensor state dict, before torch-fidelity's
    `torch.load(weights_only=False)` could unpickle arbitrary code from it."""
    path = Path(path)
    fix = f"pass --inception-weights PATH to a copy of {WEIGHTS_FILE} ({WEIGHTS_URL})"
    if not path.is_file():
        raise MetricsError(f"Inception weights file {path} does not exist: {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise MetricsError(
            f"Inception weights file {path} is not a PyTorch state dict "
            f"({safe_load_failure(error)}): {fix}"
        ) from None
    if not isinstance(state, dict):
        raise MetricsError(f"Inception weights file {path} holds no state dict: {fix}")


def _build_model(weights_path):
    try:
        return tfi.FeatureExtractorInceptionV3(
            "inception-v3-compat",
            ["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(weights_path),
        )
    except RuntimeError as error:  # load_state_dict: keys or shapes do not match
        raise MetricsError(
            f"{weights_path} is not the torch-fidelity Inception state dict "
            f"({one_line(error)[:200]}): pass --inception-weights PATH to {WEIGHTS_FILE}"
        ) from None


def as_nchw_uint8(images):
    """Check a uint8 NHWC batch (numpy or torch, as in npz files); return it NCHW in torch."""
    shape = tuple(images.shape)
    dtype = str(images.dtype).replace("torch.", "")
    if dtype != "uint8":
        raise MetricsError(
            f"sample images have dtype {dtype}, expected uint8: convert images in [-1, 1] with "
            "clamp(127.5 * x + 128, 0, 255) to uint8"
        )
    if len(shape) != 4 or shape[-1] != 3:
        hint = " (looks NCHW: transpose to NHWC)" if len(shape) == 4 and shape[1] == 3 else ""
        raise MetricsError(
            f"sample images have shape {shape}, expected (N, H, W, 3) uint8 NHWC{hint}"
        )
    if isinstance(images, np.ndarray):
        # from_numpy needs a writable array; memory-mapped or frombuffer batches are read-only.
        images = torch.from_numpy(images if images.flags.writeable else images.copy())
    return images.permute(0, 3, 1, 2)


class InceptionFeatures:
    """Callable feature extractor: uint8 NHWC batch -> dict of float64 numpy features.

    Keys: `pool` (B, 2048) pool_3; `spatial` (B, 2023) Mixed_6d.branch1x1 output, NHWC, first 7
    channels, flattened in (H, W, C) order as ADM's `mixed_6/conv[..., :7]`; `logits` (B, 1008)
    pool_3 @ fc.weight.T without the bias, whose softmax is ADM's Inception-Score distribution.
    """

    def __init__(self, weights_path=None, device="cpu"):
        weights_path = _downloaded_weights() if weights_path is None else weights_path
        _check_weights_file(weights_path)
        self.device = torch.device(device)
        self.model = _build_model(weights_path).to(self.device)
        self._spatial = None
        self.model.Mixed_6d.branch1x1.register_forward_hook(self._capture_spatial)

    def _capture_spatial(self, module, inputs, output):
        nhwc = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
        self._spatial = nhwc.reshape(output.shape[0], -1)

    def __call__(self, images):
        batch = as_nchw_uint8(images).to(self.device).contiguous()
        with torch.no_grad(), tf32_disabled():
            pool, logits = self.model(batch)
            spatial, self._spatial = self._spatial, None
        return {
            "pool": pool.cpu().numpy().astype(np.float64),
            "spatial": spatial.cpu().numpy().astype(np.float64),
            "logits": logits.cpu().numpy().astype(np.float64),
        }
