"""Latent codecs: the Stable Diffusion VAE that DiT/SiT train in, and an identity for pixel runs.

Both expose the scaled posterior, so a latent cache can store (mean, std) once and the training
loop can draw a fresh sample `mean + std * eps` every step, as DiT's on-the-fly VAE does.
"""

import json
import os
import warnings

import torch

from common import InputError

HUB_IDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
SD_VAE_DOWNSAMPLE = 8  # both SD VAEs: four encoder blocks, three of them downsampling
# Library notices raised while loading a VAE (deprecated hub arguments diffusers passes on):
# about the libraries' code, not the user's command.
LIBRARY_WARNINGS = r"(huggingface_hub|diffusers)(\.|$)"


class CodecError(InputError):
    """A codec that cannot be loaded; the message is one line naming the spec and the fix."""


class Codec:
    """Shared sampling: a latent is one draw from the scaled posterior."""

    spec: str
    latent_channels: int
    downsample: int
    scale: float

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """A posterior sample; `generator` (on the images' device) makes it reproducible."""
        mean, std = self.posterior(images)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device)
        return mean + std * eps


class PixelCodec(Codec):
    """The identity: pixel-space runs and the offline demo use images as their own latents."""

    spec, latent_channels, downsample, scale = "none", 3, 1, 1.0

    def posterior(self, images):
        images = images.float()
        return images, torch.zeros_like(images)

    def decode(self, latents):
        return latents.float()


class VAECodec(Codec):
    """diffusers' AutoencoderKL; latents are multiplied by its scaling factor (0.18215 for SD)."""

    def __init__(self, vae, spec: str, device="cpu", dtype=torch.float32):
        self.vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.spec, self.device, self.dtype = spec, torch.device(device), dtype
        self.latent_channels = vae.config.latent_channels
        self.downsample = vae_downsample(vae.config.block_out_channels)
        self.scale = float(vae.config.scaling_factor)

    @torch.no_grad()
    def posterior(self, images):
        dist = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        mean, std = (t.to(images.device, torch.float32) * self.scale for t in (dist.mean, dist.std))
        return mean, std

    @torch.no_grad()
    def decode(self, latents):
        out = self.vae.decode(latents.to(self.device, self.dtype) / self.scale).sample
        return out.to(latents.device, torch.float32)


def vae_downsample(block_out_channels) -> int:
    """An AutoencoderKL's downsampling factor: every encoder block but the last halves the side."""
    return 2 ** (len(block_out_channels) - 1)


def codec_downsample(spec: str) -> int | None:
    """The downsampling factor of the codec `spec`, known without loading (or downloading) its
    weights: 1 for none, 8 for ema/mse, a local folder's from its config.json; None where only
    loading tells (another hub id, or a folder load_codec will refuse)."""
    if spec == "none":
        return 1
    if spec in HUB_IDS:
        return SD_VAE_DOWNSAMPLE
    try:
        with open(os.path.join(os.path.expanduser(spec), "config.json")) as f:
            return vae_downsample(json.load(f)["block_out_channels"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_codec(spec: str, device="cpu", dtype=torch.float32) -> Codec:
    """Spec: "none" (pixels), "ema"/"mse" (the SD VAE, hub cache), a saved folder or a hub id."""
    if spec == "none":
        return PixelCodec()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=LIBRARY_WARNINGS)
        return _load_vae(spec, device, dtype)


def _load_vae(spec: str, device, dtype) -> Codec:
    from diffusers import AutoencoderKL

    source = os.path.expanduser(HUB_IDS.get(spec, spec))
    if os.path.isdir(source):
        try:
            vae = AutoencoderKL.from_pretrained(source, low_cpu_mem_usage=False)
        except (OSError, ValueError) as err:
            raise CodecError(
                f"VAE {spec!r}: not an AutoencoderKL folder ({str(err).splitlines()[0]}); "
                "pass a folder written by AutoencoderKL.save_pretrained"
            ) from err
        return VAECodec(vae, spec, device, dtype)
    if source.startswith((".", "/")) or os.path.exists(source):
        raise CodecError(f"VAE {spec!r}: no such directory; pass a folder saved by save_pretrained")
    try:  # the local cache first: no network round trip (and no retries) when it is there
        vae = AutoencoderKL.from_pretrained(source, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError):
        try:
            vae = AutoencoderKL.from_pretrained(source, low_cpu_mem_usage=False)
        except (OSError, ValueError) as err:
            raise CodecError(
                f"VAE {spec!r}: cannot load {source} (not in the local Hugging Face cache, and the "
                "hub is unreachable or has no such model); on a machine with network run "
                f"`hf download {source} --local-dir DIR`, then pass --vae DIR"
            ) from err
    return VAECodec(vae, spec, device, dtype)
