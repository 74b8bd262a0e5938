"""RunConfig: what every training run has (optimisation, checkpoints, logs), with its flags, which
train.py and train_classifier.py share. TrainConfig: a DiT/SiT run as train.py's flags describe
it, checked when it is made and saved in every checkpoint. The network it trains is a
ModelConfig, completed once the VAE and the dataset fix the latent sizes and the number of
classes (`model_config`)."""

import argparse
import math
from dataclasses import asdict, dataclass, field, fields

from common.cli import from_flags
from models import ModelConfig, parse_model_name
from models.codec import codec_downsample

from .errors import UsageError
from .objective import ObjectiveConfig
from .precision import add_precision_args
from .sampling import SamplerSpec


def check_rules(config, rules) -> None:
    """rules: (flag, ok, rule) triples; the first broken one is a UsageError naming the flag."""
    for flag, ok, rule in rules:
        if not ok:
            value = getattr(config, flag[2:].replace("-", "_"))
            raise UsageError(f"{flag} must be {rule}, got {value}")


@dataclass(frozen=True)
class RunConfig:
    """The fields engine.loop.TrainingLoop reads; the defaults are DiT's recipe."""

    data_path: str
    results_dir: str
    num_workers: int = 4
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
    resume: str | None = None
    log_every: int = 100
    ckpt_every: int = 50_000
    keep_checkpoints: int = 3
    tensorboard: bool = True
    wandb: str | None = None  # a Weights & Biases project

    def run_rules(self) -> list:
        finite = math.isfinite
        return [
            ("--num-workers", self.num_workers >= 0, "0 or more"),
            ("--epochs", self.epochs > 0, "positive"),
            ("--max-steps", self.max_steps is None or self.max_steps > 0, "positive"),
            ("--global-batch-size", self.global_batch_size > 0, "positive"),
            ("--lr", finite(self.lr) and self.lr > 0, "a positive number"),
            ("--weight-decay", finite(self.weight_decay) and self.weight_decay >= 0, "0 or more"),
            ("--ema-decay", finite(self.ema_decay) and 0 <= self.ema_decay <= 1, "in [0, 1]"),
            ("--grad-clip", finite(self.grad_clip) and self.grad_clip >= 0, "0 (off) or more"),
            ("--log-every", self.log_every > 0, "positive"),
            ("--ckpt-every", self.ckpt_every > 0, "positive"),
            ("--keep-checkpoints", self.keep_checkpoints >= 0, "0 (keep all) or more"),
        ]

    def to_dict(self) -> dict:
        return asdict(self)


def add_vca_args(group, contrast_grid: int, grid_note: str) -> None:
    """--contrast-grid, --stage2-softmax and --dwc, VCA's options in both training scripts."""
    group.add_argument(
        "--contrast-grid",
        type=int,
        default=contrast_grid,
        help=f"VCA: side of the pooled contrast-token grid (default {contrast_grid}: {grid_note})",
    )
    group.add_argument(
        "--stage2-softmax",
        choices=["separate", "joint"],
        default="separate",
        help="VCA: two softmaxes over n tokens (paper) or one over 2n (default separate)",
    )
    group.add_argument(
        "--dwc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="VCA: the 3x3 depthwise-conv branch on v (default on)",
    )


def add_run_args(parser: argparse.ArgumentParser, compiles: bool = True, **defaults) -> None:
    """The flags of RunConfig's fields in an "optimisation" and a "checkpoints and logs" group
    (--compile only where the script `compiles` its blocks); `defaults` replaces a flag's
    default (by field name) where a script's recipe differs."""
    d = {field.name: field.default for field in fields(RunConfig) if field.name != "data_path"}
    d.update(defaults)
    g = parser.add_argument_group("optimisation")
    g.add_argument(
        "--epochs", type=int, default=d["epochs"], help=f"epochs (default {d['epochs']})"
    )
    g.add_argument(
        "--max-steps",
        type=int,
        default=d["max_steps"],
        help="stop after this many optimizer steps (default: none, --epochs decides; "
        "overrides --epochs)",
    )
    g.add_argument(
        "--global-batch-size",
        type=int,
        default=d["global_batch_size"],
        help=f"batch size summed over all processes (default {d['global_batch_size']})",
    )
    g.add_argument("--global-seed", type=int, default=0, help="seed of everything (default 0)")
    g.add_argument(
        "--lr", type=float, default=d["lr"], help=f"AdamW learning rate (default {d['lr']:g})"
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=d["weight_decay"],
        help=f"AdamW weight decay (default {d['weight_decay']:g})",
    )
    g.add_argument(
        "--ema-decay",
        type=float,
        default=d["ema_decay"],
        help=f"EMA decay (default {d['ema_decay']:g})",
    )
    g.add_argument(
        "--grad-clip",
        type=float,
        default=d["grad_clip"],
        help="clip the gradient norm to this value (default 0: no clipping)",
    )
    add_precision_args(g, compiles=compiles)
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument(
        "--num-workers",
        type=int,
        default=d["num_workers"],
        help=f"data loader workers per process (default {d['num_workers']})",
    )

    g = parser.add_argument_group("checkpoints and logs")
    g.add_argument(
        "--results-dir",
        default=None,
        help="run folder for checkpoints and logs (default results/<model>-<attention>)",
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="auto|PATH",
        help="continue a run: from PATH (an error if it is missing), or with 'auto' (the bare "
        "flag) from the newest checkpoint in --results-dir/checkpoints that loads; auto starts "
        "from step 0 when the folder has no checkpoint yet, and is an error when it has some "
        "but none loads (default: off, and a fresh run refuses a folder that holds checkpoints)",
    )
    g.add_argument("--log-every", type=int, default=100, help="log every N steps (default 100)")
    g.add_argument(
        "--ckpt-every",
        type=int,
        default=d["ckpt_every"],
        help=f"checkpoint every N steps, and at the end (default {d['ckpt_every']})",
    )
    g.add_argument(
        "--keep-checkpoints",
        type=int,
        default=3,
        help="checkpoints kept, newest first; 0 keeps all (default 3)",
    )
    g.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write TensorBoard event files into the run folder: scalars, images and the "
        "config (default on; `tensorboard --logdir results` shows every run)",
    )
    g.add_argument(
        "--wandb",
        metavar="PROJECT",
        default=None,
        help="also log to this Weights & Biases project (needs `pip install wandb`; "
        "WANDB_MODE=offline works without network)",
    )


@dataclass(frozen=True)
class TrainConfig(RunConfig):
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
    latent_cache: str | None = None
    grad_checkpoint: bool = False
    # previews
    sample_every: int = 0
    preview_count: int = 16
    preview_cfg: float = 1.0
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    sampler: SamplerSpec | None = None  # the preview's; None: the family's default

    def __post_init__(self):
        check_rules(self, [
            *self.run_rules(),
            ("--image-size", self.image_size > 0, "positive"),
            ("--num-classes", self.num_classes is None or self.num_classes > 0, "positive"),
            ("--sample-every", self.sample_every >= 0, "0 (never) or more"),
            ("--preview-count", self.preview_count > 0, "positive"),
            ("--preview-cfg", math.isfinite(self.preview_cfg) and self.preview_cfg >= 0,
             "0 or more"),
        ])  # fmt: skip
        try:  # the network's own rules, at stand-in sizes (the real ones come from the data)
            patch = parse_model_name(self.model)[2]
        except ValueError as err:
            raise UsageError(str(err)) from None
        self.model_config(patch, 4, self.num_classes or 1)
        downsample = codec_downsample(self.vae)
        if downsample is not None:  # before the VAE is loaded, or downloaded
            self.check_image_size(downsample)

    def check_image_size(self, downsample: int) -> None:
        """A UsageError unless --image-size makes whole patches of latents with a VAE that
        downsamples by `downsample`."""
        patch = parse_model_name(self.model)[2]
        factor = downsample * patch
        if self.image_size % factor:
            raise UsageError(
                f"--image-size {self.image_size} is not divisible by {factor} (VAE factor "
                f"{downsample} x patch {patch}); use a multiple of {factor}"
            )

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
