"""The training loop behind train.py: DDP over torchrun, VAE latents (on the fly or cached), EMA,
atomic checkpoints with exact resume, SIGTERM handling, logs, and preview grids.

Exact resume rests on two choices. The data order is a pure function of (seed, epoch) and a
resumed epoch skips the batches already seen. Every random draw of a step (flip, posterior
sample, timestep, noise, label dropout) comes from the global RNG reseeded with
(seed, rank, step) at the start of that step. So step s does the same work whether or not the
run stopped before it.
"""

import argparse
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from data import LatentCacheDataset, build_dataset, build_latent_cache
from models import create_model, parse_model_name
from models.codec import load_codec

from . import dist
from .checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from .ema import create_ema
from .errors import UsageError
from .images import make_grid, save_png, to_uint8
from .logger import RunLogger
from .precision import apply_precision, compile_blocks, resolve_compile, resolve_precision
from .sampling import (
    create_objective,
    derive_seed,
    generate,
    index_noise,
    objective_config,
    sampler_from_args,
    sampling_objective,
)
from .step import TrainStep, batch_latents, create_optimizer

# Arguments that define the network: a checkpoint must agree on them to be resumed.
MODEL_ARGS = (
    "model",
    "attention",
    "image_size",
    "num_classes",
    "vae",
    "contrast_grid",
    "stage2_softmax",
    "dwc",
    "learn_sigma",
)


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


def model_opts(args) -> dict:
    opts = {}
    if args.attention not in ("mhsa", "diffattn"):
        opts = {
            "contrast_grid": args.contrast_grid,
            "stage2_softmax": args.stage2_softmax,
            "dwc": args.dwc,
        }
    return opts


def check_args(args, family: str, codec) -> int:
    """Everything knowable before touching data; returns the latent side."""
    _, _, patch = parse_model_name(args.model)
    factor = codec.downsample * patch
    if args.image_size % factor:
        raise UsageError(
            f"--image-size {args.image_size} is not divisible by {factor} "
            f"(VAE factor {codec.downsample} x patch {patch}); use a multiple of {factor}"
        )
    if args.sampler:
        sampler_from_args(family, args)
    return args.image_size // codec.downsample


class Trainer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.family, _, _ = parse_model_name(args.model)
        self.info = dist.setup(args.device)
        self.device = self.info.device
        self.log = RunLogger(args.results_dir, enabled=self.info.is_main)
        self.stop_requested = False
        args.precision = resolve_precision(args.precision, self.device)
        args.compile = resolve_compile(args.compile, self.device)
        apply_precision(args.precision)
        world = self.info.world_size
        if args.global_batch_size % world:
            raise UsageError(
                f"--global-batch-size {args.global_batch_size} is not divisible by the "
                f"{world} processes; use a multiple of {world}"
            )
        self.local_batch = args.global_batch_size // world

        self.codec = load_codec(args.vae, self.device)
        self.latent_size = latent_size = check_args(args, self.family, self.codec)
        self.dataset = self._dataset()
        torch.manual_seed(args.global_seed)  # identical initial weights on every rank
        self.model = create_model(
            args.model,
            attention=args.attention,
            input_size=latent_size,
            num_classes=args.num_classes,
            in_channels=self.codec.latent_channels,
            learn_sigma=args.learn_sigma,
            **model_opts(args),
        ).to(self.device)
        self.model.grad_checkpoint = args.grad_checkpoint
        self.ema = create_ema(self.model)
        self.opt = create_optimizer(self.model, args.lr, args.weight_decay)
        if args.compile:
            compile_blocks(self.model)
        network = self.model
        if world > 1:
            ids = [self.info.local_rank] if self.device.type == "cuda" else None
            network = DistributedDataParallel(self.model, device_ids=ids)
        self.train_step = TrainStep(
            self.model,
            network,
            create_objective(self.family, objective_config(args)),
            self.opt,
            self.ema,
            precision=args.precision,
            ema_decay=args.ema_decay,
            grad_clip=args.grad_clip,
        )
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self._resume()

        self.sampler = ResumableSampler(
            self.dataset,
            self.local_batch,
            num_replicas=world,
            rank=self.info.rank,
            shuffle=True,
            seed=args.global_seed,
        )
        if self.sampler.batches_per_epoch() == 0:
            raise UsageError(
                f"the dataset has {len(self.dataset)} items, fewer than one batch of "
                f"{self.local_batch} per process; lower --global-batch-size"
            )
        self.loader = DataLoader(
            self.dataset,
            batch_size=self.local_batch,
            sampler=self.sampler,
            num_workers=args.num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=False,
        )

    def _dataset(self):
        args = self.args
        images = build_dataset(args.data_path, args.image_size, args.num_classes)
        if args.num_classes is None:
            args.num_classes = images.num_classes
        if not args.latent_cache:
            return images
        self.log.info(f"latent cache: {args.latent_cache}")
        build_latent_cache(
            images,
            self.codec,
            args.latent_cache,
            rank=self.info.rank,
            world_size=self.info.world_size,
            batch_size=self.local_batch,
            device=self.device,
            progress=self.info.is_main and sys.stderr.isatty(),
        )
        dist.barrier()
        return LatentCacheDataset(args.latent_cache)

    def _resume(self):
        args = self.args
        path = args.resume
        if path == "auto":
            path = latest_checkpoint(self.checkpoint_dir)
            if path is None:
                self.log.info("--resume auto: no checkpoint yet, starting from scratch")
                return
        elif path is None:
            return
        state = load_checkpoint(path)
        saved = state.get("args", {})
        mismatched = [k for k in MODEL_ARGS if k in saved and saved[k] != getattr(args, k)]
        if mismatched:
            detail = ", ".join(
                f"{k}: checkpoint {saved[k]!r} vs now {getattr(args, k)!r}" for k in mismatched
            )
            raise UsageError(f"cannot resume {path}: it is from a different model ({detail})")
        try:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["opt"])
        except (KeyError, RuntimeError) as err:
            raise UsageError(f"cannot resume {path}: {str(err).splitlines()[0]}") from err
        if "scaler" in state and self.train_step.scaler.is_enabled():
            self.train_step.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        if state.get("world_size", 1) != self.info.world_size:
            self.log.info("resuming with a different world size: the data order changes")
        self.log.info(f"resumed from {path} at step {self.step}")

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.args.results_dir, "checkpoints")

    def save(self):
        state = {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.info.world_size,
            "args": plain_args(self.args),
            "rng": {"torch": torch.get_rng_state()},
        }
        if self.train_step.scaler.is_enabled():
            state["scaler"] = self.train_step.scaler.state_dict()
        if self.info.is_main:
            path = checkpoint_path(self.checkpoint_dir, self.step)
            save_checkpoint(state, path)
            prune_checkpoints(self.checkpoint_dir, self.args.keep_checkpoints)
            self.log.info(f"saved checkpoint {path}")
        dist.barrier()

    def preview(self):
        """A grid from the EMA model with fixed labels and noise, drawn by the shared sampler."""
        if not self.info.is_main:
            dist.barrier()
            return
        args = self.args
        spec = sampler_from_args(self.family, args)
        objective = sampling_objective(self.family, objective_config(args), spec)
        count = args.preview_count
        labels = torch.arange(count) % args.num_classes
        shape = (self.codec.latent_channels, self.latent_size, self.latent_size)
        noise = index_noise(range(count), args.global_seed, shape)
        generator = torch.Generator(self.device).manual_seed(args.global_seed)
        images = generate(
            self.ema,
            objective,
            spec,
            self.codec,
            labels,
            noise,
            cfg_scale=args.preview_cfg,
            generator=generator,
            precision=args.precision,
        )
        nrow = max(1, math.ceil(math.sqrt(count)))
        path = os.path.join(args.results_dir, "samples", f"{self.step:07d}.png")
        save_png(make_grid(to_uint8(images), nrow), path)
        self.log.info(f"preview grid {path}")
        dist.barrier()

    def _request_stop(self, signum, frame):
        self.stop_requested = True

    def run(self):
        args = self.args
        signal.signal(signal.SIGTERM, self._request_stop)
        control = torch_dist.new_group(backend="gloo") if torch_dist.is_initialized() else None
        per_epoch = self.sampler.batches_per_epoch()
        total = args.max_steps or args.epochs * per_epoch
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log.info(
            f"{args.model} ({args.attention}), {n_params:,} parameters, {self.info.world_size} "
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
        running = torch.zeros(2, device=self.device)  # loss sum, count
        grad_norm = torch.zeros((), device=self.device)
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        last_time, last_step = time.perf_counter(), self.step
        self.model.train()
        while self.step < total and not self.stop_requested:
            self.sampler.set_position(self.epoch, self.batch_in_epoch)
            for batch in self.loader:
                torch.manual_seed(derive_seed(args.global_seed, self.info.rank, self.step))
                latents, labels = batch_latents(batch, self.codec, self.device)
                loss, grad_norm = self.train_step(latents, labels)
                finite &= torch.isfinite(loss)
                running += torch.stack([loss, torch.ones((), device=self.device)])
                self.step += 1
                self.batch_in_epoch += 1
                if self.batch_in_epoch == per_epoch:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                bar.update(1)

                at_log = self.step % args.log_every == 0 or self.step == total
                at_ckpt = self.step % args.ckpt_every == 0 or self.step == total
                if at_log or at_ckpt:
                    self._check_finite(finite)
                if at_log:
                    now = time.perf_counter()
                    mean_loss = dist.all_reduce_mean(running[0] / running[1]).item()
                    steps_per_s = (self.step - last_step) / (now - last_time)
                    record = {
                        "step": self.step,
                        "epoch": self.epoch,
                        "loss": mean_loss,
                        "steps_per_s": steps_per_s,
                        "images_per_s": steps_per_s * args.global_batch_size,
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
                    running.zero_()
                    last_time, last_step = now, self.step
                stop = self.stop_requested = self._agree_stop(control)
                if at_ckpt or stop:
                    self.save()
                if args.sample_every and self.step % args.sample_every == 0:
                    self.preview()
                if stop or self.step >= total:
                    break
        bar.close()
        if self.stop_requested:
            self.log.info(f"SIGTERM: checkpoint written at step {self.step}; exiting")
        else:
            self.log.info(f"done at step {self.step}")
        dist.cleanup()

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


def plain_args(args: argparse.Namespace) -> dict:
    """Only plain types, so the checkpoint loads with weights_only=True."""
    plain = {}
    for key, value in vars(args).items():
        if value is None or isinstance(value, (bool, int, float, str)):
            plain[key] = value
        elif isinstance(value, (list, tuple)):
            plain[key] = [v if isinstance(v, (bool, int, float, str)) else str(v) for v in value]
        else:
            plain[key] = str(value)
    return plain
