"""Stochastic-interpolant training objective (SiT conventions: x0 noise, x1 data, t = 1 data)."""

import math
import warnings

import torch

from .path import PATHS, PREDICTIONS

LOSS_WEIGHTS = (None, "velocity", "likelihood")
ODE_OPTIONS = ("sampling_method", "num_steps", "atol", "rtol", "nfe")
SDE_OPTIONS = (
    "sampling_method",
    "diffusion_form",
    "diffusion_norm",
    "last_step",
    "last_step_size",
    "num_steps",
)


def mean_flat(x):
    return x.flatten(1).mean(1)


class Transport:
    """Objective plus the probability-flow maths shared by the samplers."""

    sample_methods = ("ode", "sde")

    def __init__(
        self,
        *,
        path_type="Linear",
        prediction="velocity",
        loss_weight=None,
        train_eps=None,
        sample_eps=None,
    ):
        if path_type not in PATHS:
            raise ValueError(f"unknown path_type {path_type!r}; choose from {tuple(PATHS)}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose from {PREDICTIONS}")
        if loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"unknown loss_weight {loss_weight!r}; choose from {LOSS_WEIGHTS}")
        if loss_weight is not None and prediction == "velocity":
            warnings.warn(
                "loss_weight applies to noise/score prediction only; the velocity loss is "
                "unweighted (as in SiT)",
                stacklevel=3,
            )
        self.path_type = path_type
        self.prediction = prediction
        self.loss_weight = loss_weight
        self.path_sampler = PATHS[path_type]()
        # SiT's defaults: velocity on Linear/GVP is finite on all of [0, 1]; the other
        # parametrisations divide by alpha or sigma at an end point and need a margin.
        vel_safe = path_type != "VP" and prediction == "velocity"
        default = 0.0 if vel_safe else 1e-3
        if train_eps is None:
            train_eps = 1e-5 if path_type == "VP" else default
        self.train_eps = float(train_eps)
        self.sample_eps = float(default if sample_eps is None else sample_eps)
        self.last_nfe = None

    def interval(self, eps, *, sde=False, diffusion_form=None, last_step_size=0.0):
        """Time span (t0, t1) integrated from noise to data, as SiT chooses it."""
        t0 = 0.0 if self.path_type == "VP" else eps
        t1 = 1.0 - last_step_size if sde and last_step_size > 0 else 1.0 - eps
        if sde and diffusion_form == "SBDM" and t0 == 0.0 and self.path_type != "VP":
            raise ValueError(
                f"SBDM diffusion is infinite at t=0 on the {self.path_type} path; "
                "create the transport with sample_eps > 0 (e.g. 1e-3)"
            )
        return t0, t1

    def prior_logp(self, z):
        """Log-density of the standard normal prior, per sample."""
        return -0.5 * z[0].numel() * math.log(2 * math.pi) - 0.5 * (z.flatten(1) ** 2).sum(1)

    def predict(self, model, x, t, model_kwargs):
        """Call the model, failing clearly on a wrong output shape (e.g. learned sigma kept)."""
        out = model(x, t, **model_kwargs)
        if out.shape != x.shape:
            raise ValueError(
                f"model output has shape {tuple(out.shape)} but x has {tuple(x.shape)}; "
                "the network must drop learned-sigma channels itself"
            )
        return out

    def to(self, out, x, t, target):
        """Model output in this transport's parametrisation -> target parametrisation."""
        return self.path_sampler.convert(out, x, t, self.prediction, target)

    def training_losses(self, model, x1, model_kwargs=None, t=None, noise=None):
        """{"loss": (B,), "pred"}; t ~ U(interval) and noise ~ N(0, I) unless given."""
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if t is None:
            t0, t1 = self.interval(self.train_eps)
            t = torch.rand(x1.shape[0], device=x1.device, dtype=x1.dtype) * (t1 - t0) + t0
        x0 = torch.randn_like(x1) if noise is None else noise
        t, xt, ut = self.path_sampler.plan(t, x0, x1)
        pred = self.predict(model, xt, t, model_kwargs)
        if self.prediction == "velocity":
            return {"loss": mean_flat((pred - ut) ** 2), "pred": pred}
        a, _, s, _, g = self.path_sampler.coefficients(t, xt)
        # SiT's weights: drift_var = g s / a is the probability-flow score coefficient.
        weight = {None: 1.0, "velocity": (g / a) ** 2, "likelihood": g / (a * s)}[self.loss_weight]
        err = pred - x0 if self.prediction == "noise" else pred * s + x0
        return {"loss": mean_flat(weight * err**2), "pred": pred}

    def sample(
        self,
        model_fn,
        noise,
        *,
        model_kwargs=None,
        method="ode",
        progress=False,
        generator=None,
        **options,
    ):
        """Uniform front door (same contract as diffusion/): noise -> final sample only.

        options go to `Sampler.sample_ode` (sampling_method, num_steps, atol, rtol, nfe) or
        `Sampler.sample_sde` (sampling_method, diffusion_form, diffusion_norm, last_step,
        last_step_size, num_steps); `self.last_nfe` then holds the model-call count.
        """
        from .sampler import Sampler

        if method not in self.sample_methods:
            raise ValueError(f"unknown sample method {method!r}; choose from {self.sample_methods}")
        allowed = ODE_OPTIONS if method == "ode" else SDE_OPTIONS
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"unknown {method} options {unknown}; allowed: {allowed}")
        sampler = Sampler(self)
        if method == "ode":
            fn = sampler.sample_ode(progress=progress, trajectory=False, **options)
        else:
            fn = sampler.sample_sde(
                progress=progress, generator=generator, trajectory=False, **options
            )
        out = fn(noise, model_fn, **(model_kwargs or {}))[-1]
        self.last_nfe = sampler.last_nfe
        return out


def create_transport(
    path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None
):
    """SiT's factory; eps default per path and prediction as in SiT."""
    return Transport(
        path_type=path_type,
        prediction=prediction,
        loss_weight=loss_weight,
        train_eps=train_eps,
        sample_eps=sample_eps,
    )
