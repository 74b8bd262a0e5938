"""The training loop behind train.py: DDP over torchrun, VAE latents (on the fly or cached), EMA,
atomic checkpoints with exact resume, SIGTERM handling, logs, and preview grids.

Exact resume rests on two choices. The data order is a pure function of (seed, epoch) and a
resumed epoch skips the batches already seen. Every random draw of a step (flip, posterior
sample, timestep, noise, label dropout) comes from the global RNG reseeded with
(seed, rank, step) at the start of that step. So step s does the same work whether or not the
run stopped before it.
"""

import os
import signal
import sys
import time

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from common import check_writable, sweep_leftovers
from data import LatentCacheDataset, build_dataset, build_latent_cache
from models import parse_model_name
from models.codec import load_codec

from . import dist
from .checkpoint import (
    check_resumable,
    checkpoint_path,
    checkpoint_to_resume,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_training_state,
    save_training_checkpoint,
)
from .ema import create_ema
from .errors import UsageError
from .images import save_png
from .logger import RunLogger, check_wandb
from .objective import create_objective
from .precision import apply_precision, compile_blocks, resolve_compile, resolve_precision
from .sampling import derive_seed, preview_grid, sampling_objective
from .step import TrainStep, batch_latents, create_optimizer
from .train_config import TrainConfig


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose epoch can start after its first `start_batch` batches."""

    def __init__(self, dataset, batch_size, **kwargs):
        super().__init__(dataset, drop_last=True, **kwargs)
        self.batch_size = batch_size
        self.start_batch = 0

    def set_position(self, epoch: int, start_batch: int):
        self.set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self):
        indices = list(super().__iter__())
        usable = len(indices) - len(indices) % self.batch_size
        return iter(indices[self.start_batch * self.batch_size : usable])

    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size


class Trainer:
    """The training loop of one run, on every rank: build, resume, then `run()`."""

    def __init__(self, config: TrainConfig):
        # Installed first: a SIGTERM while the run is being built still ends in a checkpoint.
        self.stop_requested = False
        signal.signal(signal.SIGTERM, self._request_stop)
        self.config = config
        self.family = parse_model_name(config.model)[0]
        check_writable(config.results_dir, "--results-dir")
        if config.latent_cache:
            check_writable(config.latent_cache, "--latent-cache")
        check_wandb(config.wandb)
        if config.sample_every and config.sampler is None:
            raise UsageError("previews (--sample-every) need a sampler spec in the config")
        self.resume_from = checkpoint_to_resume(self.checkpoint_dir, config.resume)
        self.info = dist.setup(config.device)
        self.device = self.info.device
        self.precision = resolve_precision(config.precision, self.device)
        apply_precision(self.precision)
        world = self.info.world_size
        if config.global_batch_size % world:
            raise UsageError(
                f"--global-batch-size {config.global_batch_size} is not divisible by the "
                f"{world} processes; use a multiple of {world}"
            )
        self.local_batch = config.global_batch_size // world

        self.codec = load_codec(config.vae, self.device)
        images = self._images()
        if len(images) // world < self.local_batch:
            raise UsageError(
                f"the dataset has {len(images)} items, fewer than one batch of "
                f"{self.local_batch} per process; lower --global-batch-size"
            )
        self.model_config = config.model_config(
            config.image_size // self.codec.downsample,
            self.codec.latent_channels,
            config.num_classes or images.num_classes,
        )
        self.resume_state = None
        if self.resume_from:
            self.resume_state = load_checkpoint(self.resume_from)
            run = {"image_size": config.image_size, "vae": config.vae}
            check_resumable(self.resume_from, self.resume_state, self.model_config, run)
        # Every input checked: from here on the run writes into its folder.
        self.log = RunLogger(
            config.results_dir,
            enabled=self.info.is_main,
            tensorboard=config.tensorboard,
            wandb=config.wandb,
        )
        if self.info.is_main:
            swept = sweep_leftovers(self.checkpoint_dir)
            if swept:
                self.log.info(f"removed {len(swept)} files of interrupted checkpoint writes")
        self.dataset = self._dataset(images)
        self.train_step = self._train_step()
        self.model, self.ema = self.train_step.model, self.train_step.ema
        self.opt = self.train_step.optimizer
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self._resume()
        self.log.start(self.step, self._configs())
        self.sampler, self.loader = self._loader()

    def _train_step(self) -> TrainStep:
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
        network = model
        if self.info.world_size > 1:
            ids = [self.info.local_rank] if self.device.type == "cuda" else None
            network = DistributedDataParallel(model, device_ids=ids)
        return TrainStep(
            model,
            network,
            create_objective(self.family, config.objective),
            optimizer,
            ema,
            precision=self.precision,
            ema_decay=config.ema_decay,
            grad_clip=config.grad_clip,
        )

    def _loader(self) -> tuple[ResumableSampler, DataLoader]:
        world = self.info.world_size
        sampler = ResumableSampler(
            self.dataset,
            self.local_batch,
            num_replicas=world,
            rank=self.info.rank,
            shuffle=True,
            seed=self.config.global_seed,
        )
        loader = DataLoader(
            self.dataset,
            batch_size=self.local_batch,
            sampler=sampler,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=False,
        )
        return sampler, loader

    def _images(self):
        config = self.config
        factor = self.codec.downsample * parse_model_name(config.model)[2]
        if config.image_size % factor:
            raise UsageError(
                f"--image-size {config.image_size} is not divisible by {factor} (VAE factor "
                f"{self.codec.downsample} x patch {factor // self.codec.downsample}); use a "
                f"multiple of {factor}"
            )
        return build_dataset(config.data_path, config.image_size, config.num_classes)

    def _dataset(self, images):
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

    def _resume(self):
        path = self.resume_from
        if path is None:
            if self.config.resume == "auto":
                self.log.info("--resume auto: no checkpoint yet, starting from scratch")
            return
        position = restore_training_state(path, self.resume_state, self.train_step)
        self.resume_state = None
        self.step = position["step"]
        self.epoch, self.batch_in_epoch = position["epoch"], position["batch_in_epoch"]
        self.log.rewind(self.step)
        if position.get("world_size", 1) != self.info.world_size:
            self.log.info("resuming with a different world size: the data order changes")
        self.log.info(f"resumed from {path} at step {self.step}")

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.config.results_dir, "checkpoints")

    def save(self):
        if self.info.is_main:
            path = checkpoint_path(self.checkpoint_dir, self.step)
            position = {
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "world_size": self.info.world_size,
            }
            save_training_checkpoint(path, self.train_step, position, self._configs())
            prune_checkpoints(self.checkpoint_dir, self.config.keep_checkpoints)
            self.log.info(f"saved checkpoint {path}")
        dist.barrier()

    def _configs(self) -> dict:
        return {
            "model": self.model_config.to_dict(),
            "objective": self.config.objective.to_dict(),
            "train": self.config.to_dict(),
        }

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

    def _request_stop(self, signum, frame):
        self.stop_requested = True

    def run(self):
        """Train to --max-steps (or --epochs), or until SIGTERM; the logs are closed (loss.png
        drawn, event files flushed) however the loop ends."""
        try:
            self._loop()
        finally:
            self.log.close()
        dist.cleanup()

    def _loop(self):
        config = self.config
        control = torch_dist.new_group(backend="gloo") if torch_dist.is_initialized() else None
        per_epoch = self.sampler.batches_per_epoch()
        total = config.max_steps or config.epochs * per_epoch
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log.info(
            f"{config.model} ({config.attention}), {n_params:,} parameters, {self.info.world_size} "
            f"process(es) on {self.device.type}, {len(self.dataset):,} items, "
            f"{per_epoch} steps/epoch, training to step {total}"
        )
        bar = tqdm(
            total=total,
            initial=self.step,
            disable=not (self.info.is_main and sys.stderr.isatty()),
            desc="train",
            dynamic_ncols=True,
        )
        self.running = torch.zeros(2, device=self.device)  # loss sum, count since the last log
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        self.last_log = (time.perf_counter(), self.step)
        self.model.train()
        if self._agree_stop(control):  # SIGTERM while the run was being built
            self.stop_requested = True
            self.save()
        while self.step < total and not self.stop_requested:
            self.sampler.set_position(self.epoch, self.batch_in_epoch)
            for batch in self.loader:
                torch.manual_seed(derive_seed(config.global_seed, self.info.rank, self.step))
                latents, labels = batch_latents(batch, self.codec, self.device)
                loss, grad_norm = self.train_step(latents, labels)
                finite &= torch.isfinite(loss)
                self.running += torch.stack([loss, torch.ones((), device=self.device)])
                self.step += 1
                self.batch_in_epoch += 1
                if self.batch_in_epoch == per_epoch:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                bar.update(1)

                at_log = self.step % config.log_every == 0 or self.step == total
                at_ckpt = self.step % config.ckpt_every == 0 or self.step == total
                stop = self.stop_requested = self._agree_stop(control)
                if at_log or at_ckpt or stop:  # no checkpoint of non-finite weights, ever
                    self._check_finite(finite)
                if at_log:
                    self._log_metrics(grad_norm)
                if at_ckpt or stop:
                    self.save()
                if config.sample_every and self.step % config.sample_every == 0:
                    self.preview()
                if stop or self.step >= total:
                    break
        bar.close()
        if self.stop_requested:
            self.log.info(f"SIGTERM: checkpoint written at step {self.step}; exiting")
        else:
            self.log.info(f"done at step {self.step}")

    def _log_metrics(self, grad_norm: torch.Tensor):
        """One metrics.jsonl record and log line: the loss averaged over the steps since the
        last one and over all ranks."""
        now = time.perf_counter()
        mean_loss = dist.all_reduce_mean(self.running[0] / self.running[1]).item()
        steps_per_s = (self.step - self.last_log[1]) / (now - self.last_log[0])
        record = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": mean_loss,
            "steps_per_s": steps_per_s,
            "images_per_s": steps_per_s * self.config.global_batch_size,
            "lr": self.opt.param_groups[0]["lr"],
            "grad_norm": float(grad_norm),
            "peak_mem_gb": peak_memory_gb(self.device),
        }
        self.log.metrics(record)
        self.log.info(
            f"step {self.step:07d} loss {mean_loss:.4f} {steps_per_s:.2f} steps/s "
            f"{record['images_per_s']:.1f} img/s lr {record['lr']:.2e} "
            f"grad {record['grad_norm']:.3f} mem {record['peak_mem_gb']:.2f} GB"
        )
        self.running.zero_()
        self.last_log = (now, self.step)

    def _agree_stop(self, group) -> bool:
        """Agree on the stop flag over a gloo group, which costs no GPU synchronisation."""
        if group is None:
            return self.stop_requested
        flag = torch.tensor([float(self.stop_requested)])
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def _check_finite(self, finite: torch.Tensor):
        ok = not dist.any_rank(not bool(finite), self.device)
        if not ok:
            last = latest_checkpoint(self.checkpoint_dir)
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
            raise NonFiniteLoss(
                f"the loss became non-finite by step {self.step}; {where} (lower --lr, "
                "set --grad-clip, or use --precision fp32/bf16)"
            )


class NonFiniteLoss(RuntimeError):
    pass


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return 0.0
