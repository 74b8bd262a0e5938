"""Rank-0 run log: console and log.txt lines, metrics.jsonl records, and a loss-curve PNG."""

import json
import os
import time

from common import atomic_write

from .images import plot_curve


class RunLogger:
    def __init__(self, folder: str, enabled: bool = True):
        self.folder = folder
        self.enabled = enabled
        self.loss_steps: list[int] = []
        self.losses: list[float] = []
        if enabled:
            os.makedirs(folder, exist_ok=True)
            self.metrics_path = os.path.join(folder, "metrics.jsonl")
            self._read_previous_losses()

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
        kept = [line for line in lines if _step(line) is not None and _step(line) <= step]
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
        if "loss" in record:
            # Drop records a resume rewinds past, so the curve has one value per step.
            while self.loss_steps and self.loss_steps[-1] >= record["step"]:
                self.loss_steps.pop()
                self.losses.pop()
            self.loss_steps.append(record["step"])
            self.losses.append(record["loss"])
            plot_curve(self.loss_steps, self.losses, os.path.join(self.folder, "loss.png"))


def _step(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line torn by a kill."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
