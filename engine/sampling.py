"""The one sampling function. It draws the training preview grid, the `sample.py` grid and the
FID samples, for DDPM (DiT) and interpolant-flow (SiT) objectives alike.

Noise, labels and the per-step noise of the stochastic samplers (DDPM, SDE) are keyed to each
sample's global index, so a sample does not depend on the batch it was drawn in, the number of
processes, or restarts. One exception: the adaptive ODE solver (dopri5) picks its steps from the
error of the whole batch, so its samples depend on the batch size (not on the number of
processes); fixed-step ODE methods do not.
"""

import argparse
import functools
from dataclasses import dataclass, field

import numpy as np
import torch

import diffusion
import transport

from .errors import UsageError
from .precision import autocast_context

METHODS = {"DiT": ("ddpm", "ddim"), "SiT": ("ode", "sde")}
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "ode": 50, "sde": 250}


@dataclass
class SamplerSpec:
    """How to sample: the method, its step count, and method-specific options."""

    method: str
    steps: int
    options: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"method": self.method, "steps": self.steps, **self.options}


def create_objective(family: str, config: dict, sampling_steps: str | int = ""):
    """The training objective of a model family from its (checkpoint-stored) config.

    DiT: ADM diffusion (`sampling_steps` respaces it, e.g. "250" or "ddim50").
    SiT: an interpolant transport; sampling steps are a sampler option instead.
    """
    if family == "DiT":
        return diffusion.create_diffusion(
            timestep_respacing=str(sampling_steps),
            noise_schedule=config.get("noise_schedule", "linear"),
            learn_sigma=config.get("learn_sigma", True),
            diffusion_steps=config.get("diffusion_steps", 1000),
        )
    return transport.create_transport(
        path_type=config.get("path_type", "Linear"),
        prediction=config.get("prediction", "velocity"),
        loss_weight=config.get("loss_weight"),
        train_eps=config.get("train_eps"),
        sample_eps=config.get("sample_eps"),
    )


def add_objective_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("objective (DDPM for DiT-*, interpolant flow for SiT-*)")
    group.add_argument(
        "--noise-schedule",
        choices=["linear", "cosine"],
        default="linear",
        help="DiT: beta schedule (default linear, as DiT)",
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


def objective_config(args: argparse.Namespace) -> dict:
    keys = (
        "noise_schedule",
        "diffusion_steps",
        "path_type",
        "prediction",
        "loss_weight",
        "train_eps",
        "sample_eps",
    )
    config = {k: getattr(args, k) for k in keys}
    learn_sigma = getattr(args, "learn_sigma", None)
    config["learn_sigma"] = True if learn_sigma is None else learn_sigma
    return config


def add_sampler_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampler")
    group.add_argument(
        "--sampler",
        choices=["ddpm", "ddim", "ode", "sde"],
        default=None,
        help="ddpm/ddim for DiT models, ode/sde for SiT models "
        "(default: ddpm for DiT, ode for SiT)",
    )
    group.add_argument(
        "--num-sampling-steps",
        type=int,
        default=None,
        help="sampling steps (default: ddpm 250, ddim 50, ode 50, sde 250); for "
        "fixed-step ODE methods the model is called steps x stages times",
    )
    group.add_argument("--ddim-eta", type=float, default=0.0, help="DDIM eta (default 0)")
    group.add_argument(
        "--ode-method",
        default="dopri5",
        help="torchdiffeq method: dopri5 (adaptive), euler, heun, midpoint, rk4 (default dopri5)",
    )
    group.add_argument("--atol", type=float, default=1e-6, help="ODE absolute tolerance (dopri5)")
    group.add_argument("--rtol", type=float, default=1e-3, help="ODE relative tolerance (dopri5)")
    group.add_argument(
        "--sde-method",
        choices=["Euler", "Heun"],
        default="Euler",
        help="SDE integrator (default Euler)",
    )
    group.add_argument(
        "--diffusion-form",
        default="sigma",
        choices=list(transport.DIFFUSION_FORMS),
        help="SDE diffusion coefficient form (default sigma)",
    )
    group.add_argument("--diffusion-norm", type=float, default=1.0, help="SDE diffusion scale")
    group.add_argument(
        "--last-step",
        default="Mean",
        choices=["Mean", "Tweedie", "Euler", "none"],
        help="SDE last step (default Mean)",
    )
    group.add_argument(
        "--last-step-size", type=float, default=0.04, help="SDE last step size (default 0.04)"
    )


def sampler_from_args(family: str, args: argparse.Namespace) -> SamplerSpec:
    """Validate the sampler flags against the model family; the UsageError names the fix."""
    method = args.sampler or METHODS[family][0]
    if method not in METHODS[family]:
        raise UsageError(
            f"sampler {method!r} does not apply to {family} models; "
            f"use one of {', '.join(METHODS[family])}"
        )
    steps = args.num_sampling_steps or DEFAULT_STEPS[method]
    if steps < 1:
        raise UsageError(f"--num-sampling-steps must be positive, got {steps}")
    if method == "ddim":
        options = {"eta": args.ddim_eta}
    elif method == "ode":
        options = {
            "sampling_method": args.ode_method,
            "num_steps": steps,
            "atol": args.atol,
            "rtol": args.rtol,
        }
    elif method == "sde":
        options = {
            "sampling_method": args.sde_method,
            "diffusion_form": args.diffusion_form,
            "diffusion_norm": args.diffusion_norm,
            "num_steps": steps,
            "last_step": None if args.last_step == "none" else args.last_step,
            "last_step_size": args.last_step_size,
        }
    else:
        options = {}
    return SamplerSpec(method, steps, options)


def sampling_objective(family: str, config: dict, spec: SamplerSpec):
    """The objective that runs `spec`: DDPM/DDIM respace the diffusion to `spec.steps`."""
    if family == "DiT":
        respacing = f"ddim{spec.steps}" if spec.method == "ddim" else str(spec.steps)
        return create_objective(family, config, respacing)
    return create_objective(family, config)


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys, e.g. (seed, index, stream) or (seed, rank,
    step): neighbouring keys give unrelated streams, unlike seed + index."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)


def index_noise(indices, seed: int, shape: tuple) -> torch.Tensor:
    """Gaussian noise of one sample per index, a pure function of (seed, index), made on the CPU
    so every device and batch split sees the same numbers."""
    out = torch.empty(len(indices), *shape)
    for row, index in enumerate(indices):
        generator = torch.Generator().manual_seed(derive_seed(seed, int(index), 0))
        out[row] = torch.randn(shape, generator=generator)
    return out


def index_generators(indices, seed: int) -> list[torch.Generator]:
    """One CPU generator per sample for the samplers' per-step noise (row i of a batch draws from
    generator i), keyed to (seed, index) like the initial noise."""
    return [torch.Generator().manual_seed(derive_seed(seed, int(i), 2)) for i in indices]


def index_labels(indices, seed: int, num_classes: int) -> torch.Tensor:
    """Uniform-random class labels keyed to the sample index (DiT/ADM's protocol)."""
    labels = [
        int(
            torch.randint(
                num_classes,
                (1,),
                generator=torch.Generator().manual_seed(derive_seed(seed, int(index), 1)),
            )
        )
        for index in indices
    ]
    return torch.tensor(labels, dtype=torch.long)


@torch.no_grad()
def generate(
    model,
    objective,
    spec: SamplerSpec,
    codec,
    labels: torch.Tensor,
    noise: torch.Tensor,
    *,
    cfg_scale: float = 1.0,
    cfg_channels: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    precision: str = "fp32",
    progress: bool = False,
) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, H, W), for `labels` from latent `noise`.

    cfg_scale > 1 doubles the batch with the null class (index num_classes) and guides through
    the model's `forward_with_cfg`. `generator` drives DDPM/SDE noise: one generator, or one per
    sample (`index_generators`) to make each sample independent of its batch.
    """
    device = next(model.parameters()).device
    noise, labels = noise.to(device), labels.to(device)
    batch = len(labels)
    if cfg_scale > 1.0:
        z = torch.cat([noise, noise])
        y = torch.cat([labels, torch.full_like(labels, model.num_classes)])
        model_fn = functools.partial(
            model.forward_with_cfg, cfg_scale=cfg_scale, cfg_channels=cfg_channels
        )
    else:
        z, y, model_fn = noise, labels, model.forward
    with autocast_context(precision, device):
        latents = objective.sample(
            model_fn,
            z,
            model_kwargs={"y": y},
            method=spec.method,
            progress=progress,
            generator=generator,
            **spec.options,
        )
        return codec.decode(latents[:batch].float())
