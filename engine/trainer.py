"""train.py's task on the shared loop (engine/loop.py): DiT/SiT in VAE latent space (latents on
the fly or from a cache), the diffusion or flow objective, and preview grids."""

import os
import sys

import torch

from common import check_writable
from data import LatentCacheDataset, build_dataset, build_latent_cache
from models import parse_model_name
from models.codec import load_codec

from . import dist
from .checkpoint import check_resumable
from .ema import create_ema
from .errors import UsageError
from .images import save_png
from .loop import NonFiniteLoss, TrainingLoop
from .objective import create_objective
from .precision import compile_blocks, resolve_compile
from .sampling import preview_grid, sampling_objective
from .step import TrainStep, batch_latents, create_optimizer

__all__ = ["NonFiniteLoss", "Trainer"]


class Trainer(TrainingLoop):
    """A DiT/SiT run of train.py, on every rank: build, resume, then `run()`."""

    def check_inputs(self):
        config = self.config
        self.family = parse_model_name(config.model)[0]
        if config.latent_cache:
            check_writable(config.latent_cache, "--latent-cache")
        if config.sample_every and config.sampler is None:
            raise UsageError("previews (--sample-every) need a sampler spec in the config")

    def build_data(self):
        """The images (after the codec that fixes the latent sizes), and the network's config."""
        config = self.config
        self.codec = load_codec(config.vae, self.device)
        config.check_image_size(self.codec.downsample)  # a hub VAE's factor is known only now
        images = build_dataset(config.data_path, config.image_size, config.num_classes)
        self.model_config = config.model_config(
            config.image_size // self.codec.downsample,
            self.codec.latent_channels,
            config.num_classes or images.num_classes,
        )
        return images

    def check_resumable(self, path, state):
        run = {"image_size": self.config.image_size, "vae": self.config.vae}
        check_resumable(path, state, self.model_config, run)

    def prepare_dataset(self, images):
        """The images, or their latent cache."""
        cache = self.config.latent_cache
        if not cache:
            return images
        self.log.info(f"latent cache: {cache}")
        build_latent_cache(
            images,
            self.codec,
            cache,
            rank=self.info.rank,
            world_size=self.info.world_size,
            batch_size=self.local_batch,
            device=self.device,
            progress=self.info.is_main and sys.stderr.isatty(),
        )
        dist.barrier()
        return LatentCacheDataset(cache)

    def build_train_step(self) -> TrainStep:
        """The network (identical initial weights on every rank), its EMA and optimizer, the
        compiled blocks and the DDP wrapper, as one TrainStep."""
        config = self.config
        torch.manual_seed(config.global_seed)
        model = self.model_config.build().to(self.device)
        model.grad_checkpoint = config.grad_checkpoint
        ema = create_ema(model)
        optimizer = create_optimizer(model, config.lr, config.weight_decay)
        if resolve_compile(config.compile, self.device):
            compile_blocks(model)
        objective = create_objective(self.family, config.objective)
        return self.train_step_for(model, ema, objective, optimizer)

    def batch_inputs(self, batch):
        return batch_latents(batch, self.codec, self.device)

    def configs(self) -> dict:
        return {
            "model": self.model_config.to_dict(),
            "objective": self.config.objective.to_dict(),
            "train": self.config.to_dict(),
        }

    def describe(self) -> str:
        return f"{self.config.model} ({self.config.attention})"

    def after_step(self):
        every = self.config.sample_every
        if every and self.step % every == 0:
            self.preview()

    def preview(self):
        """samples/<step>.png from the EMA model (engine.sampling.preview_grid)."""
        if self.info.is_main:
            config, model = self.config, self.model_config
            grid = preview_grid(
                self.ema,
                sampling_objective(self.family, config.objective, config.sampler),
                config.sampler,
                self.codec,
                (model.in_channels, model.input_size, model.input_size),
                count=config.preview_count,
                num_classes=model.num_classes,
                seed=config.global_seed,
                precision=self.precision,
            )
            path = os.path.join(config.results_dir, "samples", f"{self.step:07d}.png")
            save_png(grid, path)
            self.log.image("preview", grid, self.step)
            self.log.info(f"preview grid {path}")
        dist.barrier()
