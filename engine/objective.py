"""The training objective: ADM diffusion for DiT-* models, an interpolant flow for SiT-* models.
Its flags, its config (saved in checkpoints) and the one factory the trainer, the samplers and
the benchmarks build it with."""

import argparse
import math
from dataclasses import asdict, dataclass, fields

import diffusion
import transport
from diffusion.schedule import NOISE_SCHEDULES

from .errors import UsageError

LOSS_WEIGHTS = (None, "velocity", "likelihood")


@dataclass(frozen=True)
class ObjectiveConfig:
    """DiT fields (noise_schedule, diffusion_steps, learn_sigma) and SiT fields (path_type,
    prediction, loss_weight, train_eps, sample_eps); each family reads its own."""

    noise_schedule: str = "linear"
    diffusion_steps: int = 1000
    learn_sigma: bool = True
    path_type: str = "Linear"
    prediction: str = "velocity"
    loss_weight: str | None = None
    train_eps: float | None = None
    sample_eps: float | None = None

    def __post_init__(self):
        checks = [
            (self.noise_schedule in NOISE_SCHEDULES, f"noise_schedule one of {NOISE_SCHEDULES}"),
            (self.diffusion_steps >= 2, "diffusion_steps at least 2"),
            (self.path_type in transport.PATHS, f"path_type one of {tuple(transport.PATHS)}"),
            (self.prediction in transport.PREDICTIONS, "prediction a SiT prediction"),
            (self.loss_weight in LOSS_WEIGHTS, f"loss_weight one of {LOSS_WEIGHTS}"),
        ]
        for eps in (self.train_eps, self.sample_eps):
            checks.append((eps is None or (math.isfinite(eps) and 0 <= eps < 1), "eps in [0, 1)"))
        for ok, rule in checks:
            if not ok:
                raise UsageError(f"bad objective config {self}: needs {rule}")

    @classmethod
    def from_dict(cls, saved: dict, **overrides) -> "ObjectiveConfig":
        """From a checkpoint's config (or an older checkpoint's flat train.py args): the keys
        this config has, the rest ignored."""
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in saved.items() if k in known and v is not None}
        return cls(**{**kept, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


def create_objective(family: str, config: ObjectiveConfig, sampling_steps: str | int = ""):
    """The objective of a model family. DiT: ADM diffusion (`sampling_steps` respaces it,
    e.g. "250" or "ddim50"). SiT: an interpolant transport; its steps are a sampler option."""
    if family == "DiT":
        return diffusion.create_diffusion(
            timestep_respacing=str(sampling_steps),
            noise_schedule=config.noise_schedule,
            learn_sigma=config.learn_sigma,
            diffusion_steps=config.diffusion_steps,
        )
    return transport.create_transport(
        path_type=config.path_type,
        prediction=config.prediction,
        loss_weight=config.loss_weight,
        train_eps=config.train_eps,
        sample_eps=config.sample_eps,
    )


def add_objective_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("objective (DDPM for DiT-*, interpolant flow for SiT-*)")
    group.add_argument(
        "--noise-schedule",
        choices=["linear", "cosine"],
        default="linear",
        help="DiT: beta schedule (default linear, as DiT; cosine is ADM's squaredcos_cap_v2)",
    )
    group.add_argument(
        "--diffusion-steps",
        type=int,
        default=1000,
        help="DiT: training diffusion steps (default 1000)",
    )
    group.add_argument(
        "--path-type",
        choices=list(transport.PATHS),
        default="Linear",
        help="SiT: interpolant path (default Linear)",
    )
    group.add_argument(
        "--prediction",
        choices=list(transport.PREDICTIONS),
        default="velocity",
        help="SiT: what the network predicts (default velocity)",
    )
    group.add_argument(
        "--loss-weight",
        choices=["velocity", "likelihood"],
        default=None,
        help="SiT: loss weighting (default none)",
    )
    group.add_argument(
        "--train-eps",
        type=float,
        default=None,
        help="SiT: keep t away from the ends in training (default: SiT's per path)",
    )
    group.add_argument(
        "--sample-eps",
        type=float,
        default=None,
        help="SiT: keep t away from the ends in sampling (default: SiT's per path)",
    )


def objective_from_args(args: argparse.Namespace, learn_sigma: bool = True) -> ObjectiveConfig:
    return ObjectiveConfig(
        noise_schedule=args.noise_schedule,
        diffusion_steps=args.diffusion_steps,
        learn_sigma=learn_sigma,
        path_type=args.path_type,
        prediction=args.prediction,
        loss_weight=args.loss_weight,
        train_eps=args.train_eps,
        sample_eps=args.sample_eps,
    )
