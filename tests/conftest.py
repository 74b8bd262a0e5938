"""Shared fixtures: a random-weight Inception saved as a weights file (the real one cannot be
downloaded here), loaded through the same `weights_path` route real offline runs use; the
Triton stream kernels chosen for one test."""

import functools
import os
from unittest import mock

import pytest
import torch

# Triton picks its interpreter when it is imported, which torch_fidelity and torch._dynamo do:
# without a GPU, the Triton stream kernels run interpreted on CPU tensors, as the tests need.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory):
    """torch-fidelity's constructor always loads weights: give it an empty, non-strict load (and no
    download), give the convolutions a ReLU-preserving init so 90 layers neither vanish nor blow
    up, widen the classifier so softmaxes are peaked, and save the result as a weights file.
    (Imports here, not above: a GPU image without torch-fidelity still runs the kernel tests.)"""
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    from metrics import WEIGHTS_FILE

    torch.manual_seed(0)
    non_strict = functools.partialmethod(torch.nn.Module.load_state_dict, strict=False)
    with (
        mock.patch.object(tfi, "load_state_dict_from_url", return_value={}),
        mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", non_strict),
    ):
        model = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.nn.init.normal_(model.fc.weight, std=2.0)
    torch.nn.init.normal_(model.fc.bias, std=1.0)  # large, so leaving it out is visible
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILE
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def triton_stream_kernels():
    """set_stream_kernel("triton") for one test, the aten kernels again after it; skipped where
    Triton is not installed (macOS, Windows), since the kernels do not exist there."""
    pytest.importorskip("triton")
    from models import attention

    with attention.using_stream_kernel("triton"):
        yield


@pytest.fixture
def part_counts(monkeypatch):
    """A list that gets the number of parts of each stream-difference product the aten kernels
    run (models.attention.product_parts), in call order."""
    from models import attention

    counts = []
    product_parts = attention.product_parts

    def counted_parts(query, key, in_keys):
        parts = list(product_parts(query, key, in_keys))
        counts.append(len(parts))
        return iter(parts)

    monkeypatch.setattr(attention, "product_parts", counted_parts)
    return counts
