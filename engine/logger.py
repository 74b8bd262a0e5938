"""Rank 0's record of a run: console and log.txt lines, metrics.jsonl records, the loss.png
figure, and TensorBoard event files (Weights & Biases too, when asked and installed) in the
run folder."""

import importlib.util
import json
import math
import os
import time

from common import atomic_write
from common.plots import loss_curve

from .errors import UsageError

FIGURE_EVERY_S = 60.0
# metrics.jsonl keys that go to the dashboards as scalars, under "train/".
SCALARS = ("loss", "lr", "grad_norm", "steps_per_s", "images_per_s", "peak_mem_gb")


def check_wandb(project: str | None) -> None:
    """--wandb needs the optional wandb package; a UsageError before the run starts."""
    if project and importlib.util.find_spec("wandb") is None:
        raise UsageError(f"--wandb {project} needs the wandb package: pip install wandb")


class RunLogger:
    def __init__(
        self, folder: str, enabled: bool = True, tensorboard: bool = False, wandb: str | None = None
    ):
        self.folder = folder
        self.enabled = enabled
        self.tensorboard, self.wandb_project = tensorboard, wandb
        self.writer = self.wandb = None
        self.last_figure = -math.inf
        self.loss_steps: list[int] = []
        self.losses: list[float] = []
        if enabled:
            os.makedirs(folder, exist_ok=True)
            self.metrics_path = os.path.join(folder, "metrics.jsonl")
            self._read_previous_losses()

    def start(self, step: int, config: dict):
        """Open the dashboards at `step`, the resumed step or 0. TensorBoard hides whatever a
        killed run logged past it (purge_step), so a curve continues without duplicates; the
        run's config is written once, as text, when the run starts fresh."""
        if not self.enabled:
            return
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.folder, purge_step=step + 1 if step else None)
            if not step:
                self.writer.add_text("config", f"```\n{json.dumps(config, indent=1)}\n```", 0)
        if self.wandb_project:
            import wandb

            run_id = "".join(c if c.isalnum() else "-" for c in os.path.abspath(self.folder))[-64:]
            self.wandb = wandb.init(
                project=self.wandb_project, dir=self.folder, config=config, id=run_id,
                resume="allow",
            )  # fmt: skip

    def image(self, tag: str, image, step: int):
        """An (H, W, 3) uint8 image, e.g. a preview grid, to the dashboards."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")
            self.writer.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(image)}, step=step)

    def close(self):
        self.draw_loss()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()

    def _read_previous_losses(self):
        """A resumed run keeps drawing the curve from the start."""
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill
                if "loss" in record:
                    self.loss_steps.append(record["step"])
                    self.losses.append(record["loss"])

    def rewind(self, step: int):
        """Drop the records after `step` (a resumed run logs those steps again), so
        metrics.jsonl holds each step once."""
        if not self.enabled or not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            lines = f.readlines()
        kept = [line for line in lines if _step(line) <= step]
        if len(kept) != len(lines):
            with atomic_write(self.metrics_path, "w") as f:
                f.writelines(kept)
        while self.loss_steps and self.loss_steps[-1] > step:
            self.loss_steps.pop()
            self.losses.pop()

    def info(self, message: str):
        if not self.enabled:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
        print(line, flush=True)
        with open(os.path.join(self.folder, "log.txt"), "a") as f:
            f.write(line + "\n")

    def metrics(self, record: dict):
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.scalars({f"train/{key}": record[key] for key in SCALARS if key in record},
                     record["step"])  # fmt: skip
        if "loss" in record:
            # Drop records a resume rewinds past, so the curve has one value per step.
            while self.loss_steps and self.loss_steps[-1] >= record["step"]:
                self.loss_steps.pop()
                self.losses.pop()
            self.loss_steps.append(record["step"])
            self.losses.append(record["loss"])
            if time.monotonic() - self.last_figure >= FIGURE_EVERY_S:
                self.draw_loss()

    def scalars(self, values: dict, step: int):
        """{tag: value} to the dashboards at `step`."""
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def draw_loss(self):
        """loss.png from every loss logged so far (matplotlib costs ~0.1 s a figure, so the
        log redraws it at most every FIGURE_EVERY_S seconds, and close() once more)."""
        if self.enabled and self.losses:
            loss_curve(self.loss_steps, self.losses, os.path.join(self.folder, "loss.png"))
            self.last_figure = time.monotonic()


def _step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line torn by a kill, so no rewind
    keeps it."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
