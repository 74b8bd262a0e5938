"""Interpolation paths x_t = alpha_t * x1 + sigma_t * x0 (x0 noise, x1 data, t = 1 is data).

Everything a sampler needs follows from (alpha, alpha', sigma, sigma'). With
E[x0 | x_t] = eps and gamma = alpha' sigma - alpha sigma' (> 0 on every path here):

    score    = -eps / sigma
    velocity = (alpha' x - gamma eps) / alpha

These forms stay finite where the textbook ones (dividing by alpha or alpha') blow up,
e.g. velocity -> score at t = 0 on the Linear path.
"""

import math

import torch

PREDICTIONS = ("velocity", "noise", "score")

DIFFUSION_FORMS = (
    "sigma",
    "constant",
    "SBDM",
    "linear",
    "decreasing",
    "increasing-decreasing",
)
# SiT spells this one "inccreasing-decreasing"; accept it so SiT command lines keep working.
_DIFFUSION_ALIASES = {"inccreasing-decreasing": "increasing-decreasing"}


def expand_t_like_x(t, x):
    """(B,) times -> (B, 1, ..., 1) so they broadcast against x."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


class Path:
    """Base class: subclasses give alpha_t, sigma_t and their time derivatives."""

    def compute_alpha_t(self, t):
        raise NotImplementedError

    def compute_sigma_t(self, t):
        raise NotImplementedError

    def coefficients(self, t, x):
        """alpha, alpha', sigma, sigma' and gamma, each shaped to broadcast against x."""
        t = expand_t_like_x(t, x)
        a, da = self.compute_alpha_t(t)
        s, ds = self.compute_sigma_t(t)
        return a, da, s, ds, da * s - a * ds

    def plan(self, t, x0, x1):
        """Point on the path and its velocity target, as in SiT: returns (t, x_t, u_t)."""
        a, da, s, ds, _ = self.coefficients(t, x1)
        return t, a * x1 + s * x0, da * x1 + ds * x0

    def compute_drift(self, x, t):
        """SiT's (drift_mean, drift_var) with velocity = -drift_mean + drift_var * score."""
        a, da, s, _, g = self.coefficients(t, x)
        return -da / a * x, g * s / a

    def convert(self, out, x, t, source, target):
        """Map a model output between the velocity, noise and score parametrisations."""
        for name in (source, target):
            if name not in PREDICTIONS:
                raise ValueError(f"unknown prediction {name!r}; choose from {PREDICTIONS}")
        if source == target:
            return out
        a, da, s, _, g = self.coefficients(t, x)
        if source == "velocity":
            if target == "score":
                return (a * out - da * x) / (s * g)
            return (da * x - a * out) / g
        eps = out if source == "noise" else -s * out
        if target == "noise":
            return eps
        if target == "score":
            return -eps / s
        return (da * x - g * eps) / a

    def get_score_from_velocity(self, velocity, x, t):
        return self.convert(velocity, x, t, "velocity", "score")

    def get_noise_from_velocity(self, velocity, x, t):
        return self.convert(velocity, x, t, "velocity", "noise")

    def get_velocity_from_score(self, score, x, t):
        return self.convert(score, x, t, "score", "velocity")

    def compute_diffusion(self, x, t, form="sigma", norm=1.0):
        """SDE noise level w_t (dx = (v + w s) dt + sqrt(2 w) dW keeps the marginals of p_t)."""
        form = _DIFFUSION_ALIASES.get(form, form)
        tt = expand_t_like_x(t, x)
        if form == "constant":
            return torch.full_like(tt, float(norm))
        if form == "SBDM":
            return norm * self.compute_drift(x, t)[1]
        if form == "sigma":
            return norm * self.compute_sigma_t(tt)[0]
        if form == "linear":
            return norm * (1 - tt)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(math.pi * tt) + 1) ** 2
        if form == "increasing-decreasing":
            return norm * torch.sin(math.pi * tt) ** 2
        raise ValueError(f"unknown diffusion_form {form!r}; choose from {DIFFUSION_FORMS}")


class LinearPath(Path):
    """alpha = t, sigma = 1 - t (rectified flow)."""

    def compute_alpha_t(self, t):
        return t, torch.ones_like(t)

    def compute_sigma_t(self, t):
        return 1 - t, -torch.ones_like(t)


class GVPPath(Path):
    """alpha = sin(pi t / 2), sigma = cos(pi t / 2): alpha^2 + sigma^2 = 1."""

    def compute_alpha_t(self, t):
        h = math.pi / 2
        return torch.sin(h * t), h * torch.cos(h * t)

    def compute_sigma_t(self, t):
        h = math.pi / 2
        return torch.cos(h * t), -h * torch.sin(h * t)


class VPPath(Path):
    """Score-SDE VP schedule, time reversed: beta(t) = beta_min + (1 - t)(beta_max - beta_min)."""

    def __init__(self, beta_min=0.1, beta_max=20.0):
        self.beta_min = beta_min
        self.beta_max = beta_max

    def _log_alpha(self, t):
        u = 1 - t
        return -0.25 * u**2 * (self.beta_max - self.beta_min) - 0.5 * u * self.beta_min

    def _half_beta(self, t):
        return 0.5 * (self.beta_min + (1 - t) * (self.beta_max - self.beta_min))

    def compute_alpha_t(self, t):
        a = torch.exp(self._log_alpha(t))
        return a, a * self._half_beta(t)

    def compute_sigma_t(self, t):
        # expm1 keeps sigma accurate near t = 1, where alpha^2 -> 1.
        s = torch.sqrt(-torch.expm1(2 * self._log_alpha(t)))
        a, da = self.compute_alpha_t(t)
        return s, -a * da / s


PATHS = {"Linear": LinearPath, "GVP": GVPPath, "VP": VPPath}
