"""The training loop every task shares: DDP over torchrun, EMA, atomic checkpoints with exact
resume, SIGTERM handling, logs. train.py's diffusion/flow Trainer (engine/trainer.py) and
train_classifier.py's ClassifierTrainer (engine/classification.py) fill in the task.

Exact resume rests on two choices. The data order is a pure function of (seed, epoch) and a
resumed epoch skips the batches already seen. Every random draw of a step (flip, noise,
timestep, label dropout, mixup) comes from the global RNGs reseeded with (seed, rank, step) at
the start of that step. So step s does the same work whether or not the run stopped before it.
"""

import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from common import InputError, check_writable, lock_folder, sweep_leftovers
from common.cli import report

from . import dist
from .checkpoint import (
    checkpoint_path,
    checkpoint_to_resume,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_training_state,
    save_training_checkpoint,
)
from .errors import UsageError
from .logger import RunLogger, check_wandb
from .precision import apply_precision, resolve_precision
from .sampling import derive_seed
from .step import TrainStep


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose epoch can start after its first `start_batch` batches."""

    def __init__(self, dataset, batch_size, **kwargs):
        super().__init__(dataset, drop_last=True, **kwargs)
        self.batch_size = batch_size
        self.start_batch = 0

    def set_position(self, epoch: int, start_batch: int):
        """Also tells a dataset with per-epoch augmentation its epoch, before the loader's
        workers copy it."""
        self.set_epoch(epoch)
        self.start_batch = start_batch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self):
        indices = list(super().__iter__())
        usable = len(indices) - len(indices) % self.batch_size
        return iter(indices[self.start_batch * self.batch_size : usable])

    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size


class TrainingLoop:
    """One run's loop, on every rank: build, resume, then `run()`. A task says what it trains
    through the hooks below; `config` needs the fields every run has (engine.train_config's
    RunConfig)."""

    # ---- the task's hooks
    def check_inputs(self) -> None:
        """Task-specific checks that read nothing heavy; the run folder does not exist yet."""

    def build_data(self):
        """The training dataset (anything with len and a num_classes), on this rank's device."""
        raise NotImplementedError

    def check_resumable(self, path: str, state: dict) -> None:
        """A UsageError unless the checkpoint `state` holds this run's network."""
        raise NotImplementedError

    def build_train_step(self) -> TrainStep:
        """The network (same initial weights on every rank), EMA, optimizer and loss; the run's
        length (`total_steps`) is known by then."""
        raise NotImplementedError

    def batch_inputs(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) on the device from a loader batch; random draws from the global
        RNGs, reseeded at every step."""
        raise NotImplementedError

    def configs(self) -> dict:
        """The run's config dicts, stored in every checkpoint."""
        raise NotImplementedError

    def describe(self) -> str:
        """What is trained, for the first log line."""
        raise NotImplementedError

    def before_step(self) -> None:
        """Per-step settings (a learning-rate schedule), on every rank."""

    def after_step(self) -> None:
        """Work at the task's own intervals (previews, evaluations), on every rank."""

    # ---- the loop
    def __init__(self, config):
        # Installed first: a SIGTERM while the run is being built still ends in a checkpoint.
        self.stop_requested = False
        signal.signal(signal.SIGTERM, self._request_stop)
        self.config = config
        check_writable(config.results_dir, "--results-dir")
        check_wandb(config.wandb)
        self.check_inputs()
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
        data = self.build_data()
        if len(data) // world < self.local_batch:
            raise UsageError(
                f"the dataset has {len(data)} items, fewer than one batch of "
                f"{self.local_batch} per process; lower --global-batch-size"
            )
        # Locked before the checkpoint is read, so a duplicate run reads no (multi-GB) checkpoint;
        # a resume's folder exists already, so a refused resume leaves no new folder behind.
        self.folder_lock = self._lock_folder()
        try:
            self._build_run(data)
        except BaseException:
            self.release_folder()
            raise

    def _build_run(self, data):
        config = self.config
        self.resume_state = None
        if self.resume_from:
            self.resume_state = load_checkpoint(self.resume_from)
            self.check_resumable(self.resume_from, self.resume_state)
        # Every input checked: from here on the run writes its files.
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
        self.dataset = self.prepare_dataset(data)
        self.sampler, self.loader = self._loader()
        self.total_steps = config.max_steps or config.epochs * self.sampler.batches_per_epoch()
        self.train_step = self.build_train_step()
        self.model, self.ema = self.train_step.model, self.train_step.ema
        self.opt = self.train_step.optimizer
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self._resume()
        self.log.start(self.step, self.configs())

    def _lock_folder(self):
        """The main process's lock on the run folder for the run's life: a second run started
        in the same folder (a resubmitted job, a typo in a sweep) would interleave its
        checkpoints, pruning and logs with this one's."""
        busy, lock = False, None
        if self.info.is_main:
            try:
                lock = lock_folder(self.config.results_dir)
            except BlockingIOError:
                busy = True
        if dist.any_rank(busy, self.device):
            raise UsageError(
                f"--results-dir {self.config.results_dir} is in use by another running "
                "process; wait for it to end, or choose another folder"
            )
        return lock

    def release_folder(self):
        """Unlock the run folder (also done by the OS when the process ends): for a run started
        inside a longer-lived process, a notebook or a test, whose later runs use the folder."""
        if self.folder_lock is not None:
            self.folder_lock.close()
            self.folder_lock = None

    def train_step_for(self, model, ema, objective, optimizer) -> TrainStep:
        """The TrainStep of a built model: DDP-wrapped over several processes, with the run's
        precision, EMA decay and clipping."""
        network = model
        if self.info.world_size > 1:
            ids = [self.info.local_rank] if self.device.type == "cuda" else None
            network = DistributedDataParallel(model, device_ids=ids)
        config = self.config
        return TrainStep(
            model,
            network,
            objective,
            optimizer,
            ema,
            precision=self.precision,
            ema_decay=config.ema_decay,
            grad_clip=config.grad_clip,
        )

    def prepare_dataset(self, data):
        """What the loader reads: `data` itself unless the task caches or wraps it."""
        return data

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
            save_training_checkpoint(path, self.train_step, position, self.configs())
            prune_checkpoints(self.checkpoint_dir, self.config.keep_checkpoints)
            self.log.info(f"saved checkpoint {path}")
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
            self.release_folder()
        dist.cleanup()

    def _loop(self):
        config = self.config
        control = torch_dist.new_group(backend="gloo") if torch_dist.is_initialized() else None
        per_epoch, total = self.sampler.batches_per_epoch(), self.total_steps
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log.info(
            f"{self.describe()}, {n_params:,} parameters, {self.info.world_size} "
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
                seed = derive_seed(config.global_seed, self.info.rank, self.step)
                torch.manual_seed(seed)
                np.random.seed(seed % 2**32)  # timm's Mixup draws from numpy and random
                random.seed(seed)
                inputs, labels = self.batch_inputs(batch)
                self.before_step()
                loss, grad_norm = self.train_step(inputs, labels)
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
                self.after_step()
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


def train_main(make_trainer, early_sigterm) -> int:
    """A training script's main: build the trainer (honouring a SIGTERM that came before it
    existed) and run it; exit 2 with one line for bad input, 1 for a non-finite loss."""
    try:
        trainer = make_trainer()
        trainer.stop_requested |= bool(early_sigterm)
        trainer.run()
    except InputError as err:
        return report(err)
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return 0.0
