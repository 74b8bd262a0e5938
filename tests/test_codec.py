"""Latent codecs: a tiny random-weight AutoencoderKL saved to disk and loaded by path, checked
against diffusers called directly; the pixel identity; one-line errors when loading fails."""

import warnings

import huggingface_hub.constants
import pytest
import torch
from diffusers import AutoencoderKL

from models.codec import CodecError, PixelCodec, codec_downsample, load_codec


def tiny_vae() -> AutoencoderKL:
    """Two blocks: downsample 2, 4 latent channels; random weights, milliseconds per call."""
    torch.manual_seed(0)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    ).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    vae = tiny_vae()
    vae.save_pretrained(path)
    return vae, load_codec(str(path))


@pytest.fixture
def images():
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_vae_codec_reads_its_geometry_from_the_config(saved, images):
    _, codec = saved
    assert (codec.latent_channels, codec.downsample, codec.scale) == (4, 2, 0.18215)
    mean, std = codec.posterior(images)
    assert mean.shape == std.shape == (2, 4, 8, 8)
    assert mean.dtype == std.dtype == torch.float32


def test_posterior_is_the_scaled_diffusers_posterior(saved, images):
    vae, codec = saved
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
    mean, std = codec.posterior(images)
    torch.testing.assert_close(mean, dist.mean * 0.18215)
    torch.testing.assert_close(std, dist.std * 0.18215)
    assert std.min() > 0


def test_decode_undoes_the_scaling(saved):
    vae, codec = saved
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = vae.decode(z / 0.18215).sample
    out = codec.decode(z)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_encode_is_a_reproducible_posterior_sample(saved, images):
    _, codec = saved
    a = codec.encode(images, generator=torch.Generator().manual_seed(3))
    b = codec.encode(images, generator=torch.Generator().manual_seed(3))
    c = codec.encode(images, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    mean, std = codec.posterior(images)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, mean + std * eps)


def test_reduced_precision_codec_returns_float32(tmp_path, images):
    tiny_vae().save_pretrained(tmp_path)
    full, half = load_codec(str(tmp_path)), load_codec(str(tmp_path), dtype=torch.bfloat16)
    mean, _ = half.posterior(images)
    assert mean.dtype == torch.float32 and half.vae.dtype == torch.bfloat16
    torch.testing.assert_close(mean, full.posterior(images)[0], atol=0.05, rtol=0.05)


def test_pixel_codec_is_the_identity(images):
    codec = load_codec("none")
    assert isinstance(codec, PixelCodec)
    assert (codec.latent_channels, codec.downsample, codec.scale) == (3, 1, 1.0)
    mean, std = codec.posterior(images)
    assert torch.equal(mean, images) and torch.equal(std, torch.zeros_like(images))
    assert torch.equal(codec.encode(images, generator=torch.Generator().manual_seed(0)), images)
    assert torch.equal(codec.decode(images), images)


def test_missing_hub_model_is_one_clear_line_and_no_library_warning(monkeypatch):
    """The fix names the installed hub client's command, with the folder --vae then takes; the
    deprecation notices diffusers' hub calls raise stay out of the user's stderr."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with warnings.catch_warnings(record=True) as shown, pytest.raises(CodecError) as err:
        warnings.simplefilter("always")
        load_codec("nobody-vca/no-such-vae")
    message = str(err.value)
    assert "\n" not in message
    assert "`hf download nobody-vca/no-such-vae --local-dir DIR`, then pass --vae DIR" in message
    assert not shown, [str(w.message) for w in shown]


def test_downsampling_is_known_before_loading(saved):
    """What train.py checks --image-size against before a VAE is loaded (or downloaded)."""
    _, codec = saved  # loaded from its folder, whose path is its spec
    assert codec_downsample(codec.spec) == codec.downsample == 2
    assert codec_downsample("ema") == codec_downsample("mse") == 8
    assert codec_downsample("none") == PixelCodec.downsample == 1
    assert codec_downsample("nobody-vca/no-such-vae") is None  # known once loaded


def test_bad_local_folders_are_codec_errors(tmp_path):
    with pytest.raises(CodecError, match="not an AutoencoderKL folder") as err:
        load_codec(str(tmp_path))
    assert "\n" not in str(err.value)
    with pytest.raises(CodecError, match="no such directory"):
        load_codec(str(tmp_path / "missing"))
