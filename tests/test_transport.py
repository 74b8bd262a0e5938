"""transport/: checked against closed forms for Gaussian data, computed here independently.

For data x1 ~ N(mu, std^2) per dimension and x_t = a_t x1 + s_t x0 (x0 ~ N(0, 1)), x_t is
N(a mu, a^2 std^2 + s^2), so E[x1 | x_t], E[x0 | x_t], the score and the velocity are all
Gaussian conditioning. Path derivatives come from autograd, not from hand-written formulas.
"""

import math

import pytest
import torch
from scipy.stats import norm

from transport import Sampler, bits_per_dim, create_transport

PATHS = ("Linear", "GVP", "VP")
PREDICTIONS = ("velocity", "noise", "score")
FORMS = ("sigma", "constant", "SBDM", "linear", "decreasing", "increasing-decreasing")
MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
STD = torch.tensor([0.5, 1.5], dtype=torch.float64)


def alpha_sigma(path, t):
    if path == "Linear":
        return t, 1 - t
    if path == "GVP":
        return torch.sin(math.pi * t / 2), torch.cos(math.pi * t / 2)
    # VP: beta(s) = 0.1 + 19.9 s in the diffusion time s = 1 - t, alpha = exp(-int beta / 2).
    u = 1 - t
    a = torch.exp(-0.5 * (0.1 * u + 19.9 * u**2 / 2))
    return a, torch.sqrt(1 - a**2)


def coeffs(path, t):
    """a, a', s, s' as (B, 1) columns; derivatives by autograd."""
    with torch.enable_grad():
        t = t.detach().to(torch.float64).requires_grad_(True)
        a, s = alpha_sigma(path, t)
        (da,) = torch.autograd.grad(a.sum(), t, retain_graph=True)
        (ds,) = torch.autograd.grad(s.sum(), t)
    return [c.detach()[:, None] for c in (a, da, s, ds)]


def gaussian_field(path, kind, mu=MU, std=STD):
    """Exact model output of kind `kind` for Gaussian data, as a model function."""

    def model(x, t):
        a, da, s, ds = coeffs(path, t)
        var = a**2 * std**2 + s**2
        r = x - a * mu
        ex1, ex0 = mu + a * std**2 * r / var, s * r / var
        return {"velocity": da * ex1 + ds * ex0, "noise": ex0, "score": -r / var}[kind]

    return model


def point_mass_field(path, kind, c):
    """Exact model output when the data set is the single point c."""

    def model(x, t):
        a, da, s, ds = coeffs(path, t)
        ex0 = (x - a * c) / s
        return {"velocity": da * c + ds * ex0, "noise": ex0, "score": -ex0 / s}[kind]

    return model


def noise(n=2000, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def flow_map(path, z, t0, t1):
    """The probability-flow ODE of a Gaussian family is affine per dimension."""
    a0, _, s0, _ = coeffs(path, torch.tensor([t0]))
    a1, _, s1, _ = coeffs(path, torch.tensor([t1]))
    v0, v1 = a0**2 * STD**2 + s0**2, a1**2 * STD**2 + s1**2
    return a1 * MU + torch.sqrt(v1 / v0) * (z - a0 * MU)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many tiny tensor ops: on a busy 2-core machine thread hand-offs cost 10-50x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# method, options, largest sample-wise error allowed (values reach about 5; dopri5 runs at
# its defaults rtol 1e-3, atol 1e-6; the fixed-step tolerances follow each method's order).
ODE_METHODS = [
    ("dopri5", {}, 3e-2),
    ("euler", {"num_steps": 200}, 5e-2),
    ("heun", {"num_steps": 40}, 6e-3),
    ("midpoint", {"num_steps": 40}, 3e-3),
    ("rk4", {"num_steps": 12}, 1e-3),
]


@pytest.mark.parametrize("method,opts,tol", ODE_METHODS, ids=[m[0] for m in ODE_METHODS])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("path", PATHS)
def test_ode_reproduces_gaussian_data(path, prediction, method, opts, tol):
    tr = create_transport(path, prediction)
    z = noise()
    xs = Sampler(tr).sample_ode(sampling_method=method, **opts)(z, gaussian_field(path, prediction))
    x = xs[-1]
    t0, t1 = tr.interval(tr.sample_eps)
    # Sample by sample: the solver follows the exact affine flow map ...
    assert (x - flow_map(path, z, t0, t1)).abs().max() < tol
    # ... and the samples have the data's moments (statistical tolerance, 2000 per dim).
    n = x.shape[0]
    assert ((x.mean(0) - MU).abs() < 4 * STD / math.sqrt(n) + tol).all()
    rel_var = x.var(0) / STD**2
    assert ((rel_var - 1).abs() < 4 * math.sqrt(2 / n) + tol).all()


def test_ode_reverse_maps_data_back_to_noise():
    tr = create_transport("Linear", "velocity")
    sampler, field, z = Sampler(tr), gaussian_field("Linear", "velocity"), noise(500)
    x = sampler.sample_ode(atol=1e-8, rtol=1e-6)(z, field)[-1]
    assert (x - (MU + STD * z)).abs().max() < 1e-4
    back = sampler.sample_ode(atol=1e-8, rtol=1e-6, reverse=True)(x, field)[-1]
    assert (back - z).abs().max() < 1e-4


SDE_CASES = [
    # path, prediction, method, diffusion form, last step, num_steps
    ("Linear", "velocity", "Euler", "sigma", "Mean", 250),
    ("GVP", "velocity", "Euler", "sigma", "Mean", 250),
    ("VP", "velocity", "Euler", "sigma", "Mean", 250),
    ("Linear", "noise", "Heun", "sigma", "Tweedie", 100),
    ("Linear", "score", "Euler", "constant", "Euler", 250),
    ("GVP", "noise", "Euler", "SBDM", "Mean", 250),
    ("VP", "score", "Heun", "SBDM", "Tweedie", 100),
    ("Linear", "velocity", "Euler", "linear", None, 250),
    ("Linear", "velocity", "Heun", "decreasing", "Mean", 100),
    ("GVP", "velocity", "Euler", "increasing-decreasing", "Mean", 250),
]


@pytest.mark.parametrize("case", SDE_CASES, ids=["-".join(map(str, c[:5])) for c in SDE_CASES])
def test_sde_reproduces_gaussian_moments(case):
    path, prediction, method, form, last, steps = case
    tr = create_transport(path, prediction)
    sample = Sampler(tr).sample_sde(
        sampling_method=method,
        diffusion_form=form,
        last_step=last,
        num_steps=steps,
        generator=torch.Generator().manual_seed(1),
    )
    n = 4000
    xs = sample(noise(n), gaussian_field(path, prediction))
    assert len(xs) == steps
    x = xs[-1]
    # Statistical tolerance (4 standard errors) plus slack for the time discretisation.
    assert ((x.mean(0) - MU).abs() < 4 * STD / math.sqrt(n) + 0.02 * STD).all()
    assert ((x.std(0) / STD - 1).abs() < 4 * math.sqrt(0.5 / n) + 0.03).all()


def diffusion(form, t, norm):
    """SiT's diffusion forms w_t, for the Linear path."""
    return {
        "sigma": norm * (1 - t),
        "constant": norm + 0 * t,
        "SBDM": norm * (1 - t) / t,  # (a'/a) s^2 - s s' = (1 - t)^2 / t + (1 - t)
        "linear": norm * (1 - t),
        "decreasing": 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2,
        "increasing-decreasing": norm * torch.sin(math.pi * t) ** 2,
    }[form]


@pytest.mark.parametrize("last_step", ["Mean", "Euler", "Tweedie", None])
@pytest.mark.parametrize("form", FORMS)
def test_sde_last_step_and_diffusion_forms(form, last_step):
    """num_steps=2: one Euler-Maruyama step, then the last step, checked from the first state."""
    tr = create_transport("Linear", "velocity", sample_eps=1e-3)
    h, norm = 0.1, 0.7
    xs = Sampler(tr).sample_sde(
        diffusion_form=form,
        diffusion_norm=norm,
        last_step=last_step,
        last_step_size=h,
        num_steps=2,
        generator=torch.Generator().manual_seed(2),
    )(noise(64), gaussian_field("Linear", "velocity"))
    assert len(xs) == 2
    x, t = xs[0], torch.full((64,), 1 - h if last_step else 1 - 1e-3, dtype=torch.float64)
    v, score = (gaussian_field("Linear", k)(x, t) for k in ("velocity", "score"))
    w = diffusion(form, t[:, None], norm)
    expected = {
        "Mean": x + (v + w * score) * h,
        "Euler": x + v * h,
        "Tweedie": (x + h**2 * score) / (1 - h),  # E[x1 | x_t] with a = 1 - h, s = h
        None: x,
    }[last_step]
    assert torch.allclose(xs[1], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method,steps,tol", [("Euler", 400, 3e-2), ("Heun", 40, 1e-3)])
def test_noise_free_sde_is_the_ode_solver(method, steps, tol):
    # With zero diffusion Euler-Maruyama is Euler's method and the stochastic Heun step is
    # Heun's method (second order): both must follow the exact flow map.
    tr = create_transport("Linear", "velocity")
    z = noise(256)
    sample = Sampler(tr).sample_sde(
        sampling_method=method,
        diffusion_form="constant",
        diffusion_norm=0.0,
        last_step="Euler",
        last_step_size=0.005,
        num_steps=steps + 1,
    )
    x = sample(z, gaussian_field("Linear", "velocity"))[-1]
    assert (x - flow_map("Linear", z, 0.0, 1.0)).abs().max() < tol


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", ["velocity", "score"])
def test_likelihood_matches_gaussian_logpdf(path, prediction):
    tr = create_transport(path, prediction)
    x = MU + STD * noise(64, seed=3)
    expected = torch.as_tensor(norm.logpdf(x.numpy(), MU.numpy(), STD.numpy()).sum(1))
    field = gaussian_field(path, prediction)
    tol = 2e-3 if (path, prediction) == ("Linear", "velocity") else 2e-2
    for trace in ("exact", "hutchinson"):
        logp, z = Sampler(tr).sample_ode_likelihood(trace=trace, atol=1e-8, rtol=1e-6)(x, field)
        assert (logp - expected).abs().max() < tol, trace
    # z is where the flow sends x: (x - mu) / std in distribution terms.
    assert (z - (x - MU) / STD).abs().max() < 20 * tol
    assert torch.allclose(bits_per_dim(logp, x), -expected / (2 * math.log(2)), atol=tol)


def test_hutchinson_gaussian_probe_is_unbiased():
    tr = create_transport("Linear", "velocity")
    x = MU + STD * noise(400, seed=4)
    expected = torch.as_tensor(norm.logpdf(x.numpy(), MU.numpy(), STD.numpy()).sum(1))
    sample = Sampler(tr).sample_ode_likelihood(
        probe="gaussian", generator=torch.Generator().manual_seed(5)
    )
    err = sample(x, gaussian_field("Linear", "velocity"))[0] - expected
    # Per point the estimate is noisy (it is not exact, unlike Rademacher on a diagonal
    # Jacobian) but its mean over points is the exact log-likelihood.
    assert err.abs().max() > 0.05
    assert err.mean().abs() < 4 * err.std() / math.sqrt(len(err)) + 0.01


LOSS_CASES = [("velocity", None)] + [
    (p, w) for p in ("noise", "score") for w in (None, "velocity", "likelihood")
]


@pytest.mark.parametrize("prediction,weight", LOSS_CASES)
@pytest.mark.parametrize("path", PATHS)
def test_training_loss_zero_for_exact_point_mass_field(path, prediction, weight):
    tr = create_transport(path, prediction, loss_weight=weight)
    c = torch.tensor([0.7, -1.3, 0.2], dtype=torch.float64)
    x1 = c.repeat(64, 1)
    exact = point_mass_field(path, prediction, c)
    # Default time sampling, and an explicit grid for which we know the weights.
    assert tr.training_losses(exact, x1)["loss"].abs().max() < 1e-20
    t = torch.linspace(0.05, 0.95, 64, dtype=torch.float64)
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert tr.training_losses(exact, x1, t=t, noise=x0)["loss"].abs().max() < 1e-20

    out = tr.training_losses(lambda x, t: exact(x, t) + 0.1, x1, t=t, noise=x0)
    a, da, s, ds = coeffs(path, t)
    drift_var = da / a * s**2 - s * ds
    w = {None: 1.0, "velocity": (drift_var / s) ** 2, "likelihood": drift_var / s**2}[weight]
    scale = s**2 if prediction == "score" else 1.0
    expected = 0.01 * torch.ones(64, 1, dtype=torch.float64) * w * scale
    assert torch.allclose(out["loss"], expected[:, 0], rtol=1e-9)


@pytest.mark.parametrize("path", PATHS)
def test_training_loss_matches_independent_formula(path):
    tr = create_transport(path, "velocity")
    g = torch.Generator().manual_seed(7)
    x1 = torch.randn(8, 2, 3, 3, generator=g, dtype=torch.float64)
    x0 = torch.randn(8, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.rand(8, generator=g, dtype=torch.float64)
    y = torch.arange(8)

    def model(x, t, y):
        return 0.3 * x + t[:, None, None, None] + y[:, None, None, None]

    out = tr.training_losses(model, x1, model_kwargs=dict(y=y), t=t, noise=x0)
    a, da, s, ds = (c[:, :, None, None] for c in coeffs(path, t))
    xt = a * x1 + s * x0
    assert torch.allclose(out["pred"], model(xt, t, y))
    expected = ((model(xt, t, y) - (da * x1 + ds * x0)) ** 2).mean((1, 2, 3))
    assert torch.allclose(out["loss"], expected)
    # Without t and noise it draws them itself: the loss is random but finite.
    assert torch.isfinite(tr.training_losses(model, x1, model_kwargs=dict(y=y))["loss"]).all()


@pytest.mark.parametrize("path", PATHS)
def test_conversions_match_exact_fields(path):
    ps = create_transport(path).path_sampler
    x = noise(256, seed=8)
    t = torch.linspace(0.05, 0.95, 256, dtype=torch.float64)
    fields = {k: gaussian_field(path, k)(x, t) for k in PREDICTIONS}
    for src in PREDICTIONS:
        for dst in PREDICTIONS:
            got = ps.convert(fields[src], x, t, src, dst)
            assert torch.allclose(got, fields[dst], rtol=1e-9, atol=1e-9), (src, dst)
    assert torch.allclose(ps.get_score_from_velocity(fields["velocity"], x, t), fields["score"])
    assert torch.allclose(ps.get_noise_from_velocity(fields["velocity"], x, t), fields["noise"])
    assert torch.allclose(ps.get_velocity_from_score(fields["score"], x, t), fields["velocity"])


@pytest.mark.parametrize("path", ["Linear", "GVP"])
def test_velocity_to_score_is_finite_at_pure_noise(path):
    # At t = 0 x_t is N(0, 1), whose score is -x, even though alpha_0 = 0.
    ps = create_transport(path).path_sampler
    x, t = noise(16, seed=9), torch.zeros(16, dtype=torch.float64)
    v = gaussian_field(path, "velocity")(x, t)
    assert torch.allclose(ps.convert(v, x, t, "velocity", "score"), -x)
    assert torch.allclose(ps.convert(v, x, t, "velocity", "noise"), x)


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t, **kwargs):
        self.calls += 1
        return self.fn(x, t, **kwargs)


@pytest.mark.parametrize(
    "method,opts,calls",
    [
        ("euler", {"num_steps": 7}, 6),  # SiT's grid: 7 points, 6 steps
        ("heun", {"num_steps": 5}, 8),
        ("midpoint", {"nfe": 12}, 12),
        ("rk4", {"nfe": 8}, 8),
        ("heun", {"nfe": 50}, 50),
    ],
)
def test_fixed_step_ode_calls_model_exactly(method, opts, calls):
    tr = create_transport("Linear", "velocity")
    model = Counter(gaussian_field("Linear", "velocity"))
    sampler = Sampler(tr)
    xs = sampler.sample_ode(sampling_method=method, progress=True, **opts)(noise(8), model)
    assert model.calls == calls == sampler.last_nfe
    assert len(xs) == calls // {"euler": 1, "rk4": 4}.get(method, 2) + 1
    model.calls = 0
    x = tr.sample(model, noise(8), sampling_method=method, **opts)
    assert model.calls == calls == tr.last_nfe and x.shape == (8, 2)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_fixed_step_ode_steps_on_sits_grid(method):
    """sample_ode(num_steps=K) integrates on SiT's linspace(t0, t1, K): K - 1 steps, checked
    against Euler and Heun written out by hand on that grid."""
    tr = create_transport("Linear", "velocity", sample_eps=0.05)
    field = gaussian_field("Linear", "velocity")
    x = noise(8)
    grid = torch.linspace(0.05, 0.95, 9).tolist()  # SiT: th.linspace(t0, t1, num_steps)

    def v(y, t):
        return field(y, torch.full((len(y),), t, dtype=y.dtype))

    expected = x.clone()
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        h = t_next - t
        k1 = v(expected, t)
        if method == "euler":
            expected = expected + h * k1
        else:
            expected = expected + h / 2 * (k1 + v(expected + h * k1, t_next))
    got = Sampler(tr).sample_ode(sampling_method=method, num_steps=9)(x, field)
    assert len(got) == 9
    torch.testing.assert_close(got[-1], expected, rtol=1e-6, atol=1e-6)


def test_adaptive_ode_and_sde_report_nfe():
    tr = create_transport("GVP", "velocity")
    model = Counter(gaussian_field("GVP", "velocity"))
    tr.sample(model, noise(8))
    assert tr.last_nfe == model.calls > 6
    for method, last, calls in [("Euler", "Mean", 10), ("Heun", "Mean", 19), ("Euler", None, 9)]:
        model.calls = 0
        tr.sample(
            model, noise(8), method="sde", sampling_method=method, last_step=last, num_steps=10
        )
        assert model.calls == calls == tr.last_nfe


def test_sde_deterministic_given_generator():
    tr = create_transport("Linear", "velocity")
    field = gaussian_field("Linear", "velocity")

    def run(seed, **opts):
        g = torch.Generator().manual_seed(seed)
        return tr.sample(field, noise(16), method="sde", generator=g, num_steps=20, **opts)

    for opts in ({}, {"sampling_method": "Heun"}):
        assert torch.equal(run(0, **opts), run(0, **opts))
        assert not torch.allclose(run(0, **opts), run(1, **opts))


def test_classifier_free_guidance_via_forward_with_cfg():
    """A model's forward_with_cfg (batch = [cond; uncond]) works as the model function."""

    class Net:
        """Class 1 has data mean MU, the null class 0 has -MU (same std)."""

        def forward_with_cfg(self, x, t, y, cfg_scale):
            mu = torch.where(y[:, None] == 1, MU, -MU)
            cond, uncond = gaussian_field("Linear", "velocity", mu=mu)(x, t).chunk(2)
            guided = uncond + cfg_scale * (cond - uncond)
            return torch.cat([guided, guided])

    tr, z = create_transport("Linear", "velocity"), noise(6)
    y = torch.tensor([1] * 6 + [0] * 6)
    for scale, mu in ((1.0, MU), (0.0, -MU)):
        kw = dict(y=y, cfg_scale=scale)
        x = tr.sample(Net().forward_with_cfg, torch.cat([z, z]), model_kwargs=kw, rtol=1e-6)[:6]
        assert (x - (mu + STD * z)).abs().max() < 1e-3


def test_eps_defaults_and_intervals_follow_sit():
    def eps(*args, **kw):
        tr = create_transport(*args, **kw)
        return tr.train_eps, tr.sample_eps

    assert eps("Linear", "velocity") == (0.0, 0.0)
    assert eps("GVP", "velocity") == (0.0, 0.0)
    assert eps("Linear", "noise") == (1e-3, 1e-3)
    assert eps("GVP", "score") == (1e-3, 1e-3)
    assert eps("VP", "velocity") == (1e-5, 1e-3)
    assert eps("VP", "velocity", train_eps=1e-4) == (1e-4, 1e-3)  # SiT: sample_eps None
    assert create_transport().interval(0.0) == (0.0, 1.0)
    assert create_transport("VP").interval(1e-3) == (0.0, 1 - 1e-3)
    assert create_transport("Linear", "noise").interval(1e-3, sde=True, last_step_size=0.04) == (
        1e-3,
        0.96,
    )


TR = create_transport()
FIELD = gaussian_field("Linear", "velocity")
BAD_OPTIONS = {
    "path": lambda: create_transport("Cosine"),
    "prediction": lambda: create_transport(prediction="eps"),
    "loss_weight": lambda: create_transport(loss_weight="snr"),
    "ode_method": lambda: Sampler(TR).sample_ode(sampling_method="rk45"),
    "nfe_not_multiple": lambda: Sampler(TR).sample_ode(sampling_method="heun", nfe=7),
    "nfe_adaptive": lambda: Sampler(TR).sample_ode(nfe=10),
    "sde_method": lambda: Sampler(TR).sample_sde(sampling_method="Milstein"),
    "diffusion_form": lambda: Sampler(TR).sample_sde(diffusion_form="increasing_decreasing"),
    "last_step": lambda: Sampler(TR).sample_sde(last_step="Median"),
    "sbdm_at_t0": lambda: Sampler(TR).sample_sde(diffusion_form="SBDM"),  # infinite at t = 0
    "trace": lambda: Sampler(TR).sample_ode_likelihood(trace="diagonal"),
    "probe": lambda: Sampler(TR).sample_ode_likelihood(probe="sphere"),
    "front_door_method": lambda: TR.sample(FIELD, noise(2), method="ddim"),
    "front_door_option": lambda: TR.sample(FIELD, noise(2), steps=10),
    "sde_option_to_ode": lambda: TR.sample(FIELD, noise(2), diffusion_form="sigma"),
    "model_shape": lambda: TR.sample(lambda x, t: torch.cat([x, x], 1), noise(2)),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_options_raise_value_error(case):
    with pytest.raises(ValueError):
        BAD_OPTIONS[case]()


def test_sit_spellings_and_warnings():
    # SiT's misspelt diffusion form and capitalised method names keep working.
    Sampler(TR).sample_sde(diffusion_form="inccreasing-decreasing", sampling_method="heun")
    Sampler(TR).sample_ode(sampling_method="Euler")
    # SiT silently ignores a loss weight on the velocity loss; we say so.
    with pytest.warns(UserWarning, match="loss_weight"):
        create_transport(loss_weight="likelihood")
