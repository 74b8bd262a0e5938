"""ODE, SDE and likelihood samplers with SiT's call signatures.

Each `sample_*` method returns a function (noise, model_fn, **model_kwargs); ODE and SDE
functions return the trajectory (take [-1] for the sample), as SiT's do. After every call
`Sampler.last_nfe` holds how many times the model was evaluated.

Step counts (model evaluations, NFE):
- ODE, fixed-step method: SiT's grid, linspace(t0, t1, num_steps): num_steps points, so
  num_steps - 1 steps and NFE = (num_steps - 1) * evals per step (euler 1, heun 2, midpoint 2,
  rk4 4); the trajectory has num_steps states. Pass `nfe` instead to fix the budget: nfe /
  evals-per-step steps on a uniform grid (nfe must be a multiple of evals per step).
- ODE, adaptive method (dopri5 ...): the solver picks its steps; `num_steps` is only the number
  of returned states. Only on the VP path, undefined past t = 1, is the solver made to land
  on the end point (`step_t`); SiT never does, and elsewhere neither do we.
- SDE: as in SiT, num_steps - 1 stochastic steps on [t0, 1 - last_step_size], then the last
  step, so NFE = (num_steps - 1) * (1 Euler, 2 Heun) + (1 unless last_step is None); the
  trajectory has num_steps states. Drift and score come from one model call (SiT made two).
"""

import functools
import math

import torch
from torchdiffeq import odeint
from tqdm import tqdm

from .path import _DIFFUSION_ALIASES, DIFFUSION_FORMS

# Our name -> (torchdiffeq name, evaluations per step); "heun" is Heun's 2nd-order method.
FIXED_ODE = {
    "euler": ("euler", 1),
    "heun": ("heun2", 2),
    "heun2": ("heun2", 2),
    "midpoint": ("midpoint", 2),
    "rk4": ("rk4", 4),
}
ADAPTIVE_ODE = ("dopri5", "dopri8", "bosh3", "adaptive_heun")
ODE_METHODS = (*ADAPTIVE_ODE, *FIXED_ODE)
SDE_METHODS = ("euler", "heun")
LAST_STEPS = (None, "Mean", "Tweedie", "Euler")
TRACES = ("hutchinson", "exact")
PROBES = ("rademacher", "gaussian")


def bits_per_dim(logp, x):
    """Negative log-likelihood (nats per sample) -> bits per dimension of x."""
    return -logp / (x[0].numel() * math.log(2))


def _randn(like, generator):
    """Normal noise shaped like `like`, drawn on the generator's device (a CPU generator gives
    the same numbers whatever device the samples live on). A list of generators draws row i
    from generator[i % len], so a sample's noise does not depend on the batch it is in."""
    if isinstance(generator, (list, tuple)):
        return torch.stack(
            [_randn(row, generator[i % len(generator)]) for i, row in enumerate(like)]
        )
    device = like.device if generator is None else generator.device
    z = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
    return z.to(like.device)


class _Counted:
    """Wraps the model to count (and optionally display) function evaluations."""

    def __init__(self, model, progress, total=None):
        self.model = model
        self.calls = 0
        self.bar = tqdm(total=total, unit="nfe") if progress else None

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.bar is not None:
            self.bar.update()
        return self.model(*args, **kwargs)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _choice(value, options, what):
    key = value.lower() if isinstance(value, str) else value
    lowered = {o.lower() if isinstance(o, str) else o: o for o in options}
    if key not in lowered:
        raise ValueError(f"unknown {what} {value!r}; choose from {tuple(options)}")
    return lowered[key]


def _ode_plan(sampling_method, num_steps, nfe):
    """(torchdiffeq method, number of time points, evaluations per step or None if
    adaptive): SiT's num_steps points, or nfe / evals-per-step steps (one point more)."""
    method = _choice(sampling_method, (*FIXED_ODE, *ADAPTIVE_ODE), "ODE sampling_method")
    if method in ADAPTIVE_ODE:
        if nfe is not None:
            raise ValueError(f"nfe cannot be fixed with the adaptive method {method!r}")
        per_step = None
    else:
        method, per_step = FIXED_ODE[method]
        if nfe is not None:
            if nfe <= 0 or nfe % per_step:
                raise ValueError(f"nfe={nfe} is not a positive multiple of {per_step}")
            num_steps = nfe // per_step + 1
    if num_steps < 2:
        raise ValueError(f"num_steps counts time points, the two ends included; got {num_steps}")
    return method, num_steps, per_step


class Sampler:
    """Samplers for a `Transport`; SiT-compatible names and defaults."""

    def __init__(self, transport):
        self.transport = transport
        self.last_nfe = None

    @staticmethod
    def _times(x, t):
        """Solver time (tensor or float) -> the (B,) float tensor the model takes."""
        return torch.as_tensor(t, dtype=x.dtype, device=x.device).repeat(x.shape[0])

    def _odeint(self, f, state, t0, t1, method, points, atol, rtol, trajectory):
        """odeint on SiT's time grid, linspace(t0, t1, points) in the default float32 then
        moved to the state's device and dtype; fixed-step methods step on it even when only
        the end points are returned."""
        y = state[0] if isinstance(state, tuple) else state
        grid = torch.linspace(t0, t1, points).to(y.device, y.dtype)
        times = grid if trajectory else grid[[0, -1]]
        options = {}
        if method not in ADAPTIVE_ODE:
            options = {"grid_constructor": lambda _f, _y, _t: grid}
        elif self.transport.path_type == "VP":
            # Adaptive steps may overshoot the last time and interpolate back; the VP path is
            # undefined past t = 1, so the solver lands on the end point there.
            options = {"step_t": times[-1:]}
        return odeint(f, state, times, method=method, atol=atol, rtol=rtol, options=options)

    def sample_ode(
        self,
        *,
        sampling_method="dopri5",
        num_steps=50,
        atol=1e-6,
        rtol=1e-3,
        reverse=False,
        nfe=None,
        progress=False,
        trajectory=True,
    ):
        """Probability-flow ODE from noise to data (or data to noise with reverse=True)."""
        method, num_steps, per_step = _ode_plan(sampling_method, num_steps, nfe)
        tr = self.transport
        t0, t1 = tr.interval(tr.sample_eps)
        if reverse:
            t0, t1 = t1, t0

        def _sample(x, model, **model_kwargs):
            counted = _Counted(model, progress, per_step and per_step * (num_steps - 1))

            def f(t, y):
                t = self._times(y, t)
                return tr.to(tr.predict(counted, y, t, model_kwargs), y, t, "velocity")

            try:
                with torch.no_grad():
                    return self._odeint(f, x, t0, t1, method, num_steps, atol, rtol, trajectory)
            finally:
                counted.close()
                self.last_nfe = counted.calls

        return _sample

    def sample_sde(
        self,
        *,
        sampling_method="Euler",
        diffusion_form="sigma",
        diffusion_norm=1.0,
        last_step="Mean",
        last_step_size=0.04,
        num_steps=250,
        generator=None,
        progress=False,
        trajectory=True,
    ):
        """Reverse-time SDE dx = (v + w s) dt + sqrt(2 w) dW, which keeps the marginals of p_t."""
        method = _choice(sampling_method, SDE_METHODS, "SDE sampling_method")
        form = _choice(diffusion_form, (*DIFFUSION_FORMS, *_DIFFUSION_ALIASES), "diffusion_form")
        last_step = _choice(last_step, LAST_STEPS, "last_step")
        if num_steps < 2:
            raise ValueError("num_steps counts grid points including the last step; need >= 2")
        if last_step is None:
            last_step_size = 0.0
        tr = self.transport
        t0, t1 = tr.interval(
            tr.sample_eps, sde=True, diffusion_form=form, last_step_size=last_step_size
        )
        ts = torch.linspace(t0, t1, num_steps, dtype=torch.float64)
        plan = {"method": method, "form": form, "norm": diffusion_norm, "ts": ts}
        plan.update(last_step=last_step, last_step_size=last_step_size, generator=generator)
        return functools.partial(
            self._integrate_sde, plan=plan, progress=progress, trajectory=trajectory
        )

    def _integrate_sde(self, x, model, *, plan, progress, trajectory, **model_kwargs):
        """sample_sde's integration from the noise x, with the settings it checked."""
        tr, path = self.transport, self.transport.path_sampler
        method, form, norm, ts = plan["method"], plan["form"], plan["norm"], plan["ts"]
        last_step, generator = plan["last_step"], plan["generator"]
        dt = float(ts[1] - ts[0])
        num_steps = len(ts)
        per_step = 1 if method == "euler" else 2
        total = (num_steps - 1) * per_step + (last_step is not None)
        counted = _Counted(model, progress, total)

        def fields(y, t):
            """Velocity, score and diffusion w at (y, t) from a single model call."""
            t = self._times(y, t)
            out = tr.predict(counted, y, t, model_kwargs)
            w = path.compute_diffusion(y, t, form=form, norm=norm)
            return tr.to(out, y, t, "velocity"), tr.to(out, y, t, "score"), w

        def drift(y, t):
            v, s, w = fields(y, t)
            return v + w * s

        def noise(y):
            return _randn(y, generator) * math.sqrt(dt)

        def heun(x, t):
            """SiT's stochastic Heun: inject noise, then a Heun drift step."""
            w = path.compute_diffusion(x, self._times(x, t), form=form, norm=norm)
            x = x + torch.sqrt(2 * w) * noise(x)
            k1 = drift(x, t)
            return x + 0.5 * dt * (k1 + drift(x + dt * k1, t + dt))

        def euler(x, t):
            v, s, w = fields(x, t)
            return x + (v + w * s) * dt + torch.sqrt(2 * w) * noise(x)

        step = euler if method == "euler" else heun
        xs = []
        try:
            with torch.no_grad():
                for t in ts[:-1].tolist():
                    x = step(x, t)
                    if trajectory:
                        xs.append(x)
                x = self._last_step(x, float(ts[-1]), last_step, plan["last_step_size"], fields)
        finally:
            counted.close()
            self.last_nfe = counted.calls
        return [*xs, x] if trajectory else [x]

    def _last_step(self, x, t, last_step, size, fields):
        """Final jump from t = 1 - size to the data (noise-free)."""
        if last_step is None:
            return x
        v, s, w = fields(x, t)
        if last_step == "Mean":
            return x + (v + w * s) * size
        if last_step == "Euler":
            return x + v * size
        # Tweedie: E[x1 | x_t] = (x + sigma^2 score) / alpha.
        a, _, sig, _, _ = self.transport.path_sampler.coefficients(self._times(x, t), x)
        return (x + sig**2 * s) / a

    def sample_ode_likelihood(
        self,
        *,
        sampling_method="dopri5",
        num_steps=50,
        atol=1e-6,
        rtol=1e-3,
        nfe=None,
        trace="hutchinson",
        probe="rademacher",
        generator=None,
        progress=False,
    ):
        """log p(x) (nats per sample) by the probability-flow ODE from data to noise.

        The returned function gives (logp, z), z the noise x maps to; `bits_per_dim(logp, x)`
        converts. trace="hutchinson" uses one probe vector per sample drawn once per solve (SiT
        redrew it at every evaluation, which makes the ODE random under adaptive steps);
        trace="exact" takes one backward pass per dimension (small data only).
        """
        method, num_steps, per_step = _ode_plan(sampling_method, num_steps, nfe)
        trace = _choice(trace, TRACES, "trace")
        probe = _choice(probe, PROBES, "probe")
        tr = self.transport
        t_data, t_noise = reversed(tr.interval(tr.sample_eps))

        def _sample(x, model, **model_kwargs):
            counted = _Counted(model, progress, per_step and per_step * (num_steps - 1))
            eps = None
            if trace == "hutchinson":
                eps = _randn(x, generator)
                if probe == "rademacher":
                    eps = torch.sign(eps)

            def f(t, state):
                y = state[0].detach().requires_grad_(True)
                t = self._times(y, t)
                with torch.enable_grad():
                    v = tr.to(tr.predict(counted, y, t, model_kwargs), y, t, "velocity")
                    if eps is not None:
                        (g,) = torch.autograd.grad((v * eps).sum(), y)
                        div = (g * eps).flatten(1).sum(1)
                    else:
                        flat, div = v.flatten(1), 0
                        for i in range(flat.shape[1]):
                            (g,) = torch.autograd.grad(flat[:, i].sum(), y, retain_graph=True)
                            div = div + g.flatten(1)[:, i]
                return v.detach(), div.detach()

            state = (x, x.new_zeros(x.shape[0]))
            try:
                with torch.no_grad():
                    zs, acc = self._odeint(
                        f, state, t_data, t_noise, method, num_steps, atol, rtol, False
                    )
            finally:
                counted.close()
                self.last_nfe = counted.calls
            # Along the flow d log p_t / dt = -div v, so acc = -(integral of div v from noise).
            return tr.prior_logp(zs[-1]) + acc[-1], zs[-1]

        return _sample
