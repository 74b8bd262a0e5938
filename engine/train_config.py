"""TrainConfig: a training run as train.py's flags describe it, checked when it is made and saved
in every checkpoint. The network it trains is a ModelConfig, completed once the VAE and the
dataset fix the latent sizes and the number of classes (`model_config`)."""

import argparse
import math
from dataclasses import asdict, dataclass, field

from common.cli import from_flags
from models import ModelConfig, parse_model_name

from .errors import UsageError
from .objective import ObjectiveConfig
from .sampling import SamplerSpec


@dataclass(frozen=True)
class TrainConfig:
    data_path: str
    results_dir: str
    # the network (see model_config)
    model: str = "DiT-S/2"
    attention: str = "mhsa"
    image_size: int = 256
    num_classes: int | None = None  # None: the dataset's
    vae: str = "ema"
    contrast_grid: int = 8
    stage2_softmax: str = "separate"
    dwc: bool = True
    learn_sigma: bool | None = None  # None: on for DiT, off for SiT
    # data and optimisation
    latent_cache: str | None = None
    num_workers: int = 4
    grad_checkpoint: bool = False
    epochs: int = 1400
    max_steps: int | None = None
    global_batch_size: int = 256
    global_seed: int = 0
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    grad_clip: float = 0.0
    precision: str = "auto"
    compile: bool | None = None  # None: on for CUDA
    device: str | None = None
    # checkpoints, logs, previews
    resume: str | None = None
    log_every: int = 100
    ckpt_every: int = 50_000
    keep_checkpoints: int = 3
    sample_every: int = 0
    preview_count: int = 16
    preview_cfg: float = 1.0
    tensorboard: bool = True
    wandb: str | None = None  # a Weights & Biases project
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    sampler: SamplerSpec | None = None  # the preview's; None: the family's default

    def __post_init__(self):
        rules = [
            ("--image-size", self.image_size > 0, "positive"),
            ("--num-classes", self.num_classes is None or self.num_classes > 0, "positive"),
            ("--num-workers", self.num_workers >= 0, "0 or more"),
            ("--epochs", self.epochs > 0, "positive"),
            ("--max-steps", self.max_steps is None or self.max_steps > 0, "positive"),
            ("--global-batch-size", self.global_batch_size > 0, "positive"),
            ("--lr", math.isfinite(self.lr) and self.lr > 0, "a positive number"),
            (
                "--weight-decay",
                math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                "0 or more",
            ),
            (
                "--ema-decay",
                math.isfinite(self.ema_decay) and 0 <= self.ema_decay <= 1,
                "in [0, 1]",
            ),
            (
                "--grad-clip",
                math.isfinite(self.grad_clip) and self.grad_clip >= 0,
                "0 (off) or more",
            ),
            ("--log-every", self.log_every > 0, "positive"),
            ("--ckpt-every", self.ckpt_every > 0, "positive"),
            ("--keep-checkpoints", self.keep_checkpoints >= 0, "0 (keep all) or more"),
            ("--sample-every", self.sample_every >= 0, "0 (never) or more"),
            ("--preview-count", self.preview_count > 0, "positive"),
            (
                "--preview-cfg",
                math.isfinite(self.preview_cfg) and self.preview_cfg >= 0,
                "0 or more",
            ),
        ]
        for flag, ok, rule in rules:
            if not ok:
                value = getattr(self, flag[2:].replace("-", "_"))
                raise UsageError(f"{flag} must be {rule}, got {value}")
        try:  # the network's own rules, at stand-in sizes (the real ones come from the data)
            patch = parse_model_name(self.model)[2]
        except ValueError as err:
            raise UsageError(str(err)) from None
        self.model_config(patch, 4, self.num_classes or 1)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **given) -> "TrainConfig":
        """The flags of the same names; `given` sets the rest (the nested objective and sampler)
        and overrides flags."""
        return from_flags(cls, args, **given)

    def model_config(self, latent_size: int, latent_channels: int, num_classes: int):
        return ModelConfig(
            name=self.model,
            attention=self.attention,
            input_size=latent_size,
            in_channels=latent_channels,
            num_classes=num_classes,
            learn_sigma=self.learn_sigma,
            contrast_grid=self.contrast_grid,
            stage2_softmax=self.stage2_softmax,
            dwc=self.dwc,
        )

    def to_dict(self) -> dict:
        return asdict(self)
