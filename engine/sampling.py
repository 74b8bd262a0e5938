"""Sampling: the sampler flags and spec, the noise keyed to sample indices, and the one batched
sampling loop (`sample_batches`) that draws the training preview, the `sample.py` grid, the FID
sample sets and the sampling benchmark, for DDPM (DiT) and interpolant-flow (SiT) models alike.

Noise, labels and the per-step noise of the stochastic samplers (DDPM, SDE) are keyed to each
sample's global index, so a sample does not depend on the batch it was drawn in, the number of
processes, or restarts. One exception: the adaptive ODE solver (dopri5) picks its steps from the
error of the whole batch, so its samples depend on the batch size (not on the number of
processes); fixed-step ODE methods do not.
"""

import argparse
import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

import transport

from .errors import UsageError
from .images import make_grid, to_uint8
from .objective import ObjectiveConfig, create_objective
from .precision import autocast_context

METHODS = {"DiT": ("ddpm", "ddim"), "SiT": ("ode", "sde")}
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "ode": 50, "sde": 250}


@dataclass
class SamplerSpec:
    """How to sample: the method, its step count, method-specific options, and classifier-free
    guidance (cfg_scale 1 turns it off; cfg_channels None guides every latent channel)."""

    method: str
    steps: int
    options: dict = field(default_factory=dict)
    cfg_scale: float = 1.0
    cfg_channels: int | None = None

    def describe(self) -> dict:
        return {"method": self.method, "steps": self.steps, **self.options}


# The sampler options and their defaults, for the flags and for specs made in code alike.
SAMPLER_DEFAULTS = {
    "ddim_eta": 0.0,
    "ode_method": "dopri5",
    "atol": 1e-6,
    "rtol": 1e-3,
    "sde_method": "Euler",
    "diffusion_form": "sigma",
    "diffusion_norm": 1.0,
    "last_step": "Mean",
    "last_step_size": 0.04,
}


def add_sampler_args(parser: argparse.ArgumentParser, cfg_scale: float | None = 1.0) -> None:
    """The sampler flags; with `cfg_scale` (the script's default) also --cfg-scale,
    --cfg-channels and --seed (train.py's preview has --preview-cfg and --global-seed)."""
    d = SAMPLER_DEFAULTS
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
        help="sampling steps (default: ddpm 250, ddim 50, ode 50, sde 250); ode and sde count "
        "time points as SiT does, so a fixed-step ODE method calls the model (steps - 1) x "
        "stages times",
    )
    group.add_argument("--ddim-eta", type=float, default=d["ddim_eta"], help="DDIM eta (default 0)")
    group.add_argument(
        "--ode-method",
        default=d["ode_method"],
        help="torchdiffeq method: dopri5 (adaptive), euler, heun, midpoint, rk4 (default dopri5)",
    )
    group.add_argument(
        "--atol", type=float, default=d["atol"], help="ODE absolute tolerance (dopri5; 1e-6)"
    )
    group.add_argument(
        "--rtol", type=float, default=d["rtol"], help="ODE relative tolerance (dopri5; 1e-3)"
    )
    group.add_argument(
        "--sde-method",
        choices=["Euler", "Heun"],
        default=d["sde_method"],
        help="SDE integrator (default Euler)",
    )
    group.add_argument(
        "--diffusion-form",
        default=d["diffusion_form"],
        choices=list(transport.DIFFUSION_FORMS),
        help="SDE diffusion coefficient form (default sigma)",
    )
    group.add_argument(
        "--diffusion-norm", type=float, default=d["diffusion_norm"], help="SDE diffusion scale"
    )
    group.add_argument(
        "--last-step",
        default=d["last_step"],
        choices=["Mean", "Tweedie", "Euler", "none"],
        help="SDE last step (default Mean)",
    )
    group.add_argument(
        "--last-step-size",
        type=float,
        default=d["last_step_size"],
        help="SDE last step size (default 0.04)",
    )
    if cfg_scale is None:
        return
    group.add_argument(
        "--cfg-scale",
        type=float,
        default=cfg_scale,
        help=f"classifier-free guidance scale; 1 turns it off (default {cfg_scale:g})",
    )
    group.add_argument(
        "--cfg-channels",
        type=int,
        default=None,
        help="guide only the first N latent channels (default: all); 3 reproduces DiT's rule, "
        "on which its published numbers rest",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")


MIN_STEPS = 2  # every method counts both ends of its time grid


def check_steps_and_guidance(steps: int | None, cfg_scale: float) -> None:
    """The sampler rules that hold for every model (steps None: the method's default), which
    scripts check before they read a checkpoint (an official one is a multi-GB download)."""
    if steps is not None and steps < MIN_STEPS:
        raise UsageError(f"--num-sampling-steps must be at least {MIN_STEPS}, got {steps}")
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise UsageError(f"the guidance scale must be finite and non-negative, got {cfg_scale}")


def make_sampler(
    family: str,
    method: str | None = None,
    steps: int | None = None,
    *,
    cfg_scale: float = 1.0,
    cfg_channels: int | None = None,
    **options,
) -> SamplerSpec:
    """The spec of `method` (default: the family's first) with `steps` (default: the
    method's), the SAMPLER_DEFAULTS for the options not given; the UsageError names the fix."""
    unknown = set(options) - set(SAMPLER_DEFAULTS)
    if unknown:
        raise UsageError(f"unknown sampler options {sorted(unknown)}; known: {SAMPLER_DEFAULTS}")
    o = {**SAMPLER_DEFAULTS, **options}
    method = method or METHODS[family][0]
    if method not in METHODS[family]:
        raise UsageError(
            f"sampler {method!r} does not apply to {family} models; "
            f"use one of {', '.join(METHODS[family])}"
        )
    steps = DEFAULT_STEPS[method] if steps is None else steps
    check_steps_and_guidance(steps, cfg_scale)
    if method == "ode" and o["ode_method"] not in transport.ODE_METHODS:
        raise UsageError(
            f"unknown ODE sampling_method {o['ode_method']!r}; choose from {transport.ODE_METHODS}"
        )
    if method == "ddim":
        spec_options = {"eta": o["ddim_eta"]}
    elif method == "ode":
        spec_options = {
            "sampling_method": o["ode_method"],
            "num_steps": steps,
            "atol": o["atol"],
            "rtol": o["rtol"],
        }
    elif method == "sde":
        spec_options = {
            "sampling_method": o["sde_method"],
            "diffusion_form": o["diffusion_form"],
            "diffusion_norm": o["diffusion_norm"],
            "num_steps": steps,
            "last_step": None if o["last_step"] == "none" else o["last_step"],
            "last_step_size": o["last_step_size"],
        }
    else:
        spec_options = {}
    return SamplerSpec(method, steps, spec_options, cfg_scale, cfg_channels)


def sampler_from_args(
    family: str, args: argparse.Namespace, cfg_scale: float | None = None
) -> SamplerSpec:
    """make_sampler from the flags; guidance from --cfg-scale/--cfg-channels, or `cfg_scale`."""
    return make_sampler(
        family,
        args.sampler,
        args.num_sampling_steps,
        cfg_scale=args.cfg_scale if cfg_scale is None else cfg_scale,
        cfg_channels=getattr(args, "cfg_channels", None),
        **{key: getattr(args, key) for key in SAMPLER_DEFAULTS},
    )


def sampling_objective(family: str, config: ObjectiveConfig, spec: SamplerSpec):
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
    generator: torch.Generator | list[torch.Generator] | None = None,
    precision: str = "fp32",
    progress: bool = False,
) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, H, W), for `labels` from latent `noise`.

    Guidance (spec.cfg_scale > 1) doubles the batch with the null class (index num_classes)
    and guides through the model's `forward_with_cfg`. `generator` drives DDPM/SDE noise: one
    generator, or one per sample (`index_generators`) to make each sample independent of its
    batch.
    """
    device = next(model.parameters()).device
    noise, labels = noise.to(device), labels.to(device)
    batch = len(labels)
    if spec.cfg_scale > 1.0:
        z = torch.cat([noise, noise])
        y = torch.cat([labels, torch.full_like(labels, model.num_classes)])
        model_fn = functools.partial(
            model.forward_with_cfg, cfg_scale=spec.cfg_scale, cfg_channels=spec.cfg_channels
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


def sample_batches(
    model,
    objective,
    spec: SamplerSpec,
    codec,
    labels: torch.Tensor,
    latent_shape: tuple,
    *,
    seed: int,
    batch_size: int,
    first_index: int = 0,
    precision: str = "fp32",
    progress: bool = False,
    uint8: bool = True,
):
    """Yield (indices, images, labels) for `labels`, `batch_size` at a time: images as uint8
    (B, H, W, 3), or with `uint8=False` as generate returns them.

    Sample i (numbered from `first_index`) gets its initial and per-step noise from
    (seed, i) alone, so an image depends on its index and label, not on the batch it was
    drawn in, the process that drew it, or the script: the same checkpoint, labels and seed
    give the same preview grid in train.py as in sample.py.
    """
    for start in range(0, len(labels), batch_size):
        indices = range(first_index + start, first_index + min(start + batch_size, len(labels)))
        batch_labels = labels[start : start + len(indices)]
        images = generate(
            model,
            objective,
            spec,
            codec,
            batch_labels,
            index_noise(indices, seed, latent_shape),
            generator=index_generators(indices, seed),
            precision=precision,
            progress=progress,
        )
        yield indices, to_uint8(images) if uint8 else images, batch_labels


def preview_grid(
    model, objective, spec, codec, latent_shape, *, count, num_classes, seed, precision="fp32"
) -> np.ndarray:
    """The training preview: `count` images for labels 0, 1, 2, ... (modulo num_classes),
    ceil(sqrt(count)) per row, drawn by sample_batches. It is the grid sample.py draws from
    the same checkpoint with those labels, --seed `seed`, the same sampler and guidance, and
    --nrow ceil(sqrt(count))."""
    labels = torch.arange(count) % num_classes
    batches = sample_batches(
        model,
        objective,
        spec,
        codec,
        labels,
        latent_shape,
        seed=seed,
        batch_size=count,
        precision=precision,
    )
    images = np.concatenate([images for _, images, _ in batches])
    return make_grid(images, max(1, math.ceil(math.sqrt(count))))
