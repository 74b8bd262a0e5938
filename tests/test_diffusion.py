"""diffusion/: schedules, q and posterior, losses, respacing and samplers against closed forms
computed here in float64 numpy, independently of the package."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from diffusion import GaussianDiffusion, create_diffusion, discretized_gaussian_log_likelihood
from diffusion.schedule import space_timesteps

T = 1000


def linear_alphas_cumprod(steps=T):
    scale = 1000 / steps
    return np.cumprod(1.0 - np.linspace(1e-4 * scale, 0.02 * scale, steps))


def kept_schedule(respacing):
    """(original timesteps kept, ᾱ at them, ᾱ at the previous kept step) of a linear schedule."""
    keep = np.array(sorted(space_timesteps(T, respacing))) if respacing else np.arange(T)
    abar = linear_alphas_cumprod()[keep]
    return keep, abar, np.append(1.0, abar[:-1])


def bayes_posterior(x0, xt, abar, abar_prev):
    """q(x_{t-1} | x_t, x_0) by Gaussian conditioning: the prior q(x_{t-1} | x_0) times the
    likelihood q(x_t | x_{t-1}); valid for t >= 1."""
    alpha = abar / abar_prev
    beta = 1.0 - alpha
    var = 1.0 / (alpha / beta + 1.0 / (1.0 - abar_prev))
    mean = var * (np.sqrt(alpha) * xt / beta + np.sqrt(abar_prev) * x0 / (1.0 - abar_prev))
    return mean, var


def bcast(values, ndim):
    return np.asarray(values).reshape(-1, *([1] * (ndim - 1)))


def to_np(x):
    return x.detach().cpu().numpy()


# --- schedules, q(x_t | x_0), posterior, variances ----------------------------------------------


def test_linear_schedule():
    d = create_diffusion("")
    np.testing.assert_allclose(d.betas, np.linspace(1e-4, 0.02, T), rtol=1e-9)
    np.testing.assert_allclose(d.alphas_cumprod, linear_alphas_cumprod(), rtol=1e-12)
    assert d.alphas_cumprod[-1] == pytest.approx(4.036e-5, rel=1e-3)  # DDPM's ᾱ_T
    half = create_diffusion("", diffusion_steps=500)
    np.testing.assert_allclose(half.betas, np.linspace(2e-4, 0.04, 500), rtol=1e-9)


@pytest.mark.parametrize("name", ["squaredcos_cap_v2", "cosine"])
def test_cosine_schedule(name):
    """train.py offers --noise-schedule cosine: an alias of squaredcos_cap_v2, same closed form."""
    d = create_diffusion("", noise_schedule=name)

    def f(s):
        return np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2

    # ᾱ_t = f((t + 1) / T) / f(0) until the final step, where beta is capped at 0.999.
    np.testing.assert_allclose(d.alphas_cumprod[:-1], f(np.arange(1, T) / T) / f(0), rtol=1e-9)
    assert d.betas[-1] == pytest.approx(0.999)
    assert (d.betas <= 0.999).all() and (np.diff(d.betas) > 0).all()
    with pytest.raises(ValueError, match="noise schedule"):
        create_diffusion("", noise_schedule="quadratic")


def test_q_sample_and_q_mean_variance():
    d = create_diffusion("")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 17, 500, 999])
    abar = bcast(linear_alphas_cumprod()[t.numpy()], 4)
    mean, var, log_var = d.q_mean_variance(x0, t)
    np.testing.assert_allclose(to_np(mean), np.sqrt(abar) * to_np(x0), rtol=1e-12)
    np.testing.assert_allclose(to_np(var), np.broadcast_to(1 - abar, x0.shape), rtol=1e-12)
    np.testing.assert_allclose(to_np(log_var), np.log(np.broadcast_to(1 - abar, x0.shape)))
    xt = d.q_sample(x0, t, noise=noise)
    expected = np.sqrt(abar) * to_np(x0) + np.sqrt(1 - abar) * to_np(noise)
    np.testing.assert_allclose(to_np(xt), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("respacing", ["", "ddim50", "250"])
def test_posterior_matches_gaussian_conditioning(respacing):
    d = create_diffusion(respacing)
    _, abar, abar_prev = kept_schedule(respacing)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    xt = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 7, d.num_timesteps // 2, d.num_timesteps - 1])
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    ab, abp = bcast(abar[t.numpy()], 4), bcast(abar_prev[t.numpy()], 4)
    exp_mean, exp_var = bayes_posterior(to_np(x0), to_np(xt), ab, abp)
    np.testing.assert_allclose(to_np(mean), exp_mean, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(to_np(var), np.broadcast_to(exp_var, x0.shape), rtol=1e-8)
    np.testing.assert_allclose(to_np(log_var), np.log(np.broadcast_to(exp_var, x0.shape)))

    # At t = 0 the posterior is a point mass at x_0; the log-variance is clipped to t = 1's.
    t0 = torch.zeros(5, dtype=torch.long)
    mean0, var0, log_var0 = d.q_posterior_mean_variance(x0, xt, t0)
    np.testing.assert_allclose(to_np(mean0), to_np(x0), rtol=1e-10, atol=1e-12)
    assert (var0 == 0).all()
    _, var1 = bayes_posterior(0.0, 0.0, abar[1], abar_prev[1])
    np.testing.assert_allclose(to_np(log_var0), np.log(var1), rtol=1e-10)


def test_learned_range_and_fixed_variances():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    v = torch.rand(x.shape, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([1, 10, 400, 999])
    abar = linear_alphas_cumprod()
    ab, abp = bcast(abar[t.numpy()], 4), bcast(abar[t.numpy() - 1], 4)
    beta = 1 - ab / abp
    _, post_var = bayes_posterior(0.0, 0.0, ab, abp)

    d = create_diffusion("")
    out = d.p_mean_variance(lambda x_, t_: torch.cat([eps, v], 1), x, t, clip_denoised=False)
    frac = (to_np(v) + 1) / 2
    expected_log_var = frac * np.log(beta) + (1 - frac) * np.log(post_var)
    np.testing.assert_allclose(to_np(out["log_variance"]), expected_log_var, rtol=1e-9)
    np.testing.assert_allclose(to_np(out["variance"]), np.exp(expected_log_var), rtol=1e-9)
    x0_hat = (to_np(x) - np.sqrt(1 - ab) * to_np(eps)) / np.sqrt(ab)
    np.testing.assert_allclose(to_np(out["pred_xstart"]), x0_hat, rtol=1e-9, atol=1e-12)
    mean, _ = bayes_posterior(x0_hat, to_np(x), ab, abp)
    np.testing.assert_allclose(to_np(out["mean"]), mean, rtol=1e-8, atol=1e-12)

    clipped = d.p_mean_variance(lambda x_, t_: torch.cat([eps, v], 1), x, t)
    np.testing.assert_allclose(to_np(clipped["pred_xstart"]), np.clip(x0_hat, -1, 1), atol=1e-12)

    for sigma_small, expected_var in ((True, post_var), (False, beta)):
        fixed = create_diffusion("", learn_sigma=False, sigma_small=sigma_small)
        out = fixed.p_mean_variance(lambda x_, t_: eps, x, t, clip_denoised=False)
        np.testing.assert_allclose(
            to_np(out["variance"]), np.broadcast_to(expected_var, x.shape), rtol=1e-9
        )

    with pytest.raises(ValueError, match="6 channels"):
        d.p_mean_variance(lambda x_, t_: eps, x, t)


def test_discretized_gaussian_log_likelihood_against_scipy():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, size=400) / 127.5 - 1
    x[:20], x[20:40] = -1.0, 1.0  # the edge bins extend to infinity
    scale = rng.uniform(0.003, 0.03, size=x.shape)
    means = x + rng.uniform(-1.5, 1.5, size=x.shape) * scale
    means[:5] -= 0.03  # mass outside [-1, 1], only an edge bin captures it
    means[20:25] += 0.03
    lower = np.where(x < -0.999, -np.inf, (x - 1 / 255 - means) / scale)
    upper = np.where(x > 0.999, np.inf, (x + 1 / 255 - means) / scale)
    prob = norm.cdf(upper) - norm.cdf(lower)
    assert prob.min() > 0.01

    log_p = discretized_gaussian_log_likelihood(
        torch.from_numpy(x),
        means=torch.from_numpy(means),
        log_scales=torch.from_numpy(np.log(scale)),
    )
    # ADM's tanh approximation of Φ is within 1.8e-4 of it everywhere, so each bin's
    # probability is within 3.6e-4.
    np.testing.assert_allclose(np.exp(to_np(log_p)), prob, atol=3.6e-4, rtol=0)
    np.testing.assert_allclose(to_np(log_p), np.log(prob), atol=3.6e-4 / 0.01)


# --- respacing ------------------------------------------------------------------------------


@pytest.mark.parametrize("respacing", ["250", "50,50", "ddim50", "10,15,20", "1000"])
def test_respacing_keeps_alphas_cumprod(respacing):
    d = create_diffusion(respacing)
    keep, abar, abar_prev = kept_schedule(respacing)
    assert d.timestep_map == list(keep)
    assert d.num_timesteps == len(keep)
    np.testing.assert_allclose(d.alphas_cumprod, abar, rtol=1e-12)
    np.testing.assert_allclose(d.betas, 1 - abar / abar_prev, rtol=1e-9)


def test_respacing_layout():
    steps = sorted(space_timesteps(T, "250"))
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == T - 1
    assert set(np.diff(steps)) == {4, 5}  # 999 / 249 ≈ 4.01: as even as integers allow
    steps = sorted(space_timesteps(T, "50,50"))
    first, second = steps[:50], steps[50:]
    assert (first[0], first[-1], second[0], second[-1]) == (0, 499, 500, 999)
    assert space_timesteps(T, "ddim50") == set(range(0, T, 20))
    assert space_timesteps(T, "ddim25") == set(range(0, T, 40))
    assert space_timesteps(T, [T]) == set(range(T))


@pytest.mark.parametrize(
    "bad, message",
    [
        ("abc", "expected 'N'"),
        ("ddim", "expected 'N'"),
        ("50,,50", "expected 'N'"),
        ("2000", "cannot take 2000"),
        ("ddim999", "no integer stride"),
        ("1", "at least 2"),
    ],
)
def test_invalid_respacing(bad, message):
    with pytest.raises(ValueError, match=message):
        create_diffusion(bad)


def test_model_sees_original_timesteps_and_kwargs():
    d = create_diffusion("250", learn_sigma=False)
    seen = []

    def model(x, t, y, cfg_scale):
        assert t.dtype == torch.long and cfg_scale == 4.0
        assert torch.equal(y, torch.tensor([3, 7]))
        seen.append(t.tolist())
        return torch.zeros_like(x)

    kwargs = dict(y=torch.tensor([3, 7]), cfg_scale=4.0)
    d.p_sample_loop(model, (2, 1), noise=torch.zeros(2, 1), model_kwargs=kwargs)
    assert [ts[0] for ts in seen] == d.timestep_map[::-1]
    assert all(ts[0] == ts[1] for ts in seen)


# --- training losses ------------------------------------------------------------------------


def toy_output(xt, t_orig, channels, learn_sigma, predict_xstart):
    """A deterministic 'network' used both through torch and, here, in numpy. Near t = 0 its
    x_0 estimate is close to x_t, so decoder likelihoods are not vanishingly small."""
    lib = torch if isinstance(xt, torch.Tensor) else np
    t_feature = lib.sin(t_orig / 100.0).reshape(-1, *([1] * (xt.ndim - 1)))
    prediction = (1.0 if predict_xstart else 0.5) * xt + 0.1 * t_feature
    if not learn_sigma:
        return prediction
    v = lib.tanh(2.0 * xt[:, :channels] - t_feature)
    return lib.concatenate([prediction, v], 1) if lib is np else torch.cat([prediction, v], 1)


def reference_losses(x0, noise, t, respacing, learn_sigma, predict_xstart, vb_scale):
    """MSE and VLB terms written from the DDPM/IDDPM formulas (float64 numpy, scipy Φ)."""
    keep, abar, abar_prev = kept_schedule(respacing)
    ab, abp = bcast(abar[t], x0.ndim), bcast(abar_prev[t], x0.ndim)
    xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
    out = toy_output(xt, keep[t].astype(np.float64), x0.shape[1], learn_sigma, predict_xstart)
    prediction = out[:, : x0.shape[1]]
    target = x0 if predict_xstart else noise
    terms = {"mse": ((target - prediction) ** 2).reshape(len(t), -1).mean(1)}
    if not learn_sigma:
        return terms, None

    x0_hat = prediction if predict_xstart else (xt - np.sqrt(1 - ab) * prediction) / np.sqrt(ab)
    beta = 1 - ab / abp
    safe_abp = np.where(abp < 1, abp, (1 + ab) / 2)  # t = 0 is the decoder term, below
    true_mean, true_var = bayes_posterior(x0, xt, ab, safe_abp)
    model_mean, _ = bayes_posterior(x0_hat, xt, ab, safe_abp)
    model_mean = np.where(abp < 1, model_mean, x0_hat)
    # The learned range uses the t = 1 posterior variance at t = 0.
    _, min_var = bayes_posterior(0.0, 0.0, ab, safe_abp)
    min_var = np.where(abp < 1, min_var, bayes_posterior(0.0, 0.0, abar[1], abar_prev[1])[1])
    frac = (out[:, x0.shape[1] :] + 1) / 2
    log_var = frac * np.log(beta) + (1 - frac) * np.log(min_var)
    kl = 0.5 * (
        log_var
        - np.log(true_var)
        + (true_var + (true_mean - model_mean) ** 2) / np.exp(log_var)
        - 1
    )
    kl = kl.reshape(len(t), -1).mean(1) / math.log(2)

    std = np.exp(0.5 * log_var)
    upper = np.where(x0 > 0.999, np.inf, (x0 + 1 / 255 - model_mean) / std)
    lower = np.where(x0 < -0.999, -np.inf, (x0 - 1 / 255 - model_mean) / std)
    prob = np.where(t.reshape(abp.shape) == 0, norm.cdf(upper) - norm.cdf(lower), 1.0)
    assert prob.min() > 0.01
    nll = (-np.log(prob)).reshape(len(t), -1).mean(1) / math.log(2)
    # Allowance for ADM's tanh approximation of Φ: within 3.6e-4 per bin in probability.
    nll_tolerance = -np.log(1 - 3.6e-4 / prob).reshape(len(t), -1).mean(1) / math.log(2)
    terms["vb"] = np.where(t == 0, nll, kl) * vb_scale
    return terms, np.where(t == 0, nll_tolerance * vb_scale, 0.0)


def assert_close_per_item(actual, expected, atol, rtol=1e-7):
    error = np.abs(to_np(actual) - expected)
    assert (error <= atol + rtol * np.abs(expected)).all(), (to_np(actual), expected, atol)


@pytest.mark.parametrize(
    "respacing, options",
    [
        ("", {}),
        ("250", dict(rescale_learned_sigmas=True)),
        ("", dict(predict_xstart=True)),
        ("", dict(learn_sigma=False)),
        ("ddim50", dict(use_kl=True)),
    ],
)
def test_training_losses_match_reference(respacing, options):
    d = create_diffusion(respacing, **options)
    learn_sigma = options.get("learn_sigma", True)
    predict_xstart = options.get("predict_xstart", False)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, 256, (6, 2, 4, 4), generator=g).double() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    noise[:2] *= 0.2  # keeps the toy model's t = 0 decoder likelihoods well above 0
    t = torch.tensor([0, 0, 1, 5, d.num_timesteps // 2, d.num_timesteps - 1])

    def model(xt, t_orig):
        return toy_output(xt, t_orig.double(), 2, learn_sigma, predict_xstart)

    losses = d.training_losses(model, x0, t, noise=noise)
    vb_scale = d.num_timesteps / 1000 if options.get("rescale_learned_sigmas") else 1.0
    ref, nll_tol = reference_losses(
        to_np(x0), to_np(noise), t.numpy(), respacing, learn_sigma, predict_xstart, vb_scale
    )
    if options.get("use_kl"):
        assert set(losses) == {"loss"}
        expected = ref["vb"] * d.num_timesteps
        assert_close_per_item(losses["loss"], expected, nll_tol * d.num_timesteps)
        return
    np.testing.assert_allclose(to_np(losses["mse"]), ref["mse"], rtol=1e-10)
    if not learn_sigma:
        assert set(losses) == {"loss", "mse"}
        np.testing.assert_allclose(to_np(losses["loss"]), ref["mse"], rtol=1e-10)
        return
    assert set(losses) == {"loss", "mse", "vb"}
    assert_close_per_item(losses["vb"], ref["vb"], nll_tol)
    np.testing.assert_allclose(to_np(losses["loss"]), to_np(losses["mse"] + losses["vb"]))
    assert ref["vb"][2:].min() > 0 and ref["vb"][2:].max() > 0.1  # a non-trivial comparison


def test_vb_term_does_not_train_the_mean():
    d = create_diffusion("")
    mean_weight = torch.tensor(0.7, requires_grad=True)
    var_weight = torch.tensor(0.3, requires_grad=True)

    def model(xt, t):
        return torch.cat([mean_weight * xt, torch.tanh(var_weight * xt)], 1)

    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(4, 2, 3, 3, generator=g) * 2 - 1
    t = torch.tensor([0, 3, 300, 999])
    noise = torch.randn(x0.shape, generator=g)
    losses = d.training_losses(model, x0, t, noise=noise)
    mean_grad, var_grad = torch.autograd.grad(
        losses["vb"].sum(), [mean_weight, var_weight], allow_unused=True, retain_graph=True
    )
    assert (mean_grad is None or mean_grad == 0) and var_grad != 0
    mse_grads = torch.autograd.grad(
        losses["mse"].sum(), [mean_weight, var_weight], allow_unused=True, retain_graph=True
    )
    assert mse_grads[0] != 0 and (mse_grads[1] is None or mse_grads[1] == 0)
    (total_mean_grad,) = torch.autograd.grad(losses["loss"].sum(), [mean_weight])
    torch.testing.assert_close(total_mean_grad, mse_grads[0])


def test_training_losses_draws_t_when_not_given():
    d = create_diffusion("250")
    seen = []

    def model(xt, t):
        seen.append(t)
        return torch.cat([torch.zeros_like(xt), torch.zeros_like(xt)], 1)

    torch.manual_seed(0)
    first = d.training_losses(model, torch.zeros(2000, 1))
    torch.manual_seed(0)
    second = d.training_losses(model, torch.zeros(2000, 1))
    torch.testing.assert_close(first["loss"], second["loss"])
    drawn = seen[0]
    assert drawn.dtype == torch.long and drawn.shape == (2000,)
    assert set(drawn.tolist()) <= set(d.timestep_map)
    assert len(set(drawn.tolist())) > 240  # ~all 250 kept steps appear among 2000 draws
    assert first["loss"].shape == (2000,) and torch.isfinite(first["loss"]).all()


# --- samplers: exact laws for Gaussian data ------------------------------------------------------

MU, S = 0.5, 0.5  # data x_0 ~ N(MU, S^2) in every dimension
SHAPE = (4, 8000)  # 32,000 draws, under torch's parallel grain size: no thread stalls when busy


def optimal_eps(x, abar):
    """E[eps | x_t] for Gaussian data."""
    return np.sqrt(1 - abar) * (x - np.sqrt(abar) * MU) / (abar * S**2 + 1 - abar)


def analytic_model(learn_sigma=False, v=0.0, timestep_of=None):
    """The optimal ε-predictor, told the original timestep; `timestep_of` can corrupt it."""
    abar_all = linear_alphas_cumprod()

    def model(x, t):
        t = t if timestep_of is None else timestep_of(t)
        abar = torch.from_numpy(abar_all[t.cpu().numpy()]).to(x).view(-1, 1)
        eps = torch.sqrt(1 - abar) * (x - torch.sqrt(abar) * MU) / (abar * S**2 + 1 - abar)
        return torch.cat([eps, torch.full_like(x, v)], 1) if learn_sigma else eps

    return model


def chain_law(respacing, sampler, variance="small", v=0.0, eta=0.0):
    """Exact mean and variance of the discrete sampler's output from x_T ~ N(0, 1).

    Every step is affine in x_t plus independent Gaussian noise, so the law is Gaussian and
    propagates in closed form.
    """
    _, abar, abar_prev = kept_schedule(respacing)
    mean, var = 0.0, 1.0
    for k in range(len(abar) - 1, -1, -1):
        ab, abp = abar[k], abar_prev[k]

        def step_mean(x, k=k, ab=ab, abp=abp):
            eps = optimal_eps(x, ab)
            x0_hat = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
            if k == 0:
                return x0_hat
            if sampler == "ddim":
                sigma2 = eta**2 * bayes_posterior(0.0, 0.0, ab, abp)[1]
                return np.sqrt(abp) * x0_hat + np.sqrt(1 - abp - sigma2) * eps
            return bayes_posterior(x0_hat, x, ab, abp)[0]

        offset = step_mean(0.0)
        slope = step_mean(1.0) - offset
        if k == 0:
            noise_var = 0.0
        else:
            post_var = bayes_posterior(0.0, 0.0, ab, abp)[1]
            beta = 1 - ab / abp
            noise_var = {
                "small": post_var,
                "large": beta,
                "learned": np.exp((1 + v) / 2 * np.log(beta) + (1 - v) / 2 * np.log(post_var)),
                "ddim": eta**2 * post_var,
            }[variance]
        mean, var = slope * mean + offset, slope**2 * var + noise_var
    return mean, var


def matches_law(samples, law, z=4.5):
    """Sample mean and variance within z standard errors of a Gaussian law's."""
    x = to_np(samples).astype(np.float64).ravel()
    mean, var = law
    mean_ok = abs(x.mean() - mean) < z * math.sqrt(var / x.size)
    var_ok = abs(x.var() - var) < z * var * math.sqrt(2 / x.size)
    return mean_ok and var_ok


SAMPLER_CASES = {
    "ddpm-fixed-small": (dict(learn_sigma=False, sigma_small=True), "250", "ddpm", {}, "small"),
    "ddpm-fixed-large": (dict(learn_sigma=False), "250", "ddpm", {}, "large"),
    "ddpm-learned-v0.3": (dict(), "250", "ddpm", dict(v=0.3), "learned"),
    "ddim-eta0": (dict(learn_sigma=False), "ddim50", "ddim", dict(eta=0.0), "ddim"),
    "ddim-eta1": (dict(learn_sigma=False), "ddim50", "ddim", dict(eta=1.0), "ddim"),
}


def draw(d, sampler, model, seed, eta=0.0, clip=False):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, generator=g)
    loop = d.p_sample_loop if sampler == "ddpm" else d.ddim_sample_loop
    extra = {} if sampler == "ddpm" else dict(eta=eta)
    return loop(model, SHAPE, noise=noise, clip_denoised=clip, generator=g, **extra)


@pytest.mark.parametrize("case", list(SAMPLER_CASES))
def test_sampler_reproduces_gaussian_data(case):
    options, respacing, sampler, kw, variance = SAMPLER_CASES[case]
    d = create_diffusion(respacing, **options)
    model = analytic_model(options.get("learn_sigma", True), v=kw.get("v", 0.0))
    samples = draw(d, sampler, model, seed=6, eta=kw.get("eta", 0.0))
    law = chain_law(respacing, sampler, variance, **kw)
    # The discrete chain itself is close to the data law: the rest is discretisation error.
    assert abs(law[0] - MU) < 0.01 and abs(law[1] / S**2 - 1) < 0.25
    assert matches_law(samples, law), (to_np(samples).mean(), to_np(samples).var(), law)


def test_last_step_returns_the_mean():
    d = create_diffusion("250", learn_sigma=False)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([0, 5])
    model = analytic_model()
    mean = d.p_mean_variance(model, x, t, clip_denoised=False)["mean"]
    for step in (d.p_sample, lambda *a, **k: d.ddim_sample(*a, eta=1.0, **k)):
        sample = step(model, x, t, clip_denoised=False, generator=torch.Generator().manual_seed(9))
        assert torch.equal(sample["sample"][0], mean[0])
        assert not torch.allclose(sample["sample"][1], mean[1])


def test_sampler_check_catches_wrong_variance_and_missing_timestep_map():
    d = create_diffusion("250", learn_sigma=False, sigma_small=True)
    small, large = chain_law("250", "ddpm", "small"), chain_law("250", "ddpm", "large")
    samples = draw(d, "ddpm", analytic_model(), seed=7)
    assert matches_law(samples, small)
    assert not matches_law(samples, large)  # beta instead of the posterior variance

    # A sampler that forgot the respacing map hands the model its own step index.
    keep = torch.tensor(d.timestep_map)
    unmapped = analytic_model(timestep_of=lambda t: torch.searchsorted(keep, t))
    assert not matches_law(draw(d, "ddpm", unmapped, seed=7), small)
    ddim = create_diffusion("ddim50", learn_sigma=False)
    keep = torch.tensor(ddim.timestep_map)
    unmapped = analytic_model(timestep_of=lambda t: torch.searchsorted(keep, t))
    assert not matches_law(
        draw(ddim, "ddim", unmapped, seed=7), chain_law("ddim50", "ddim", "ddim")
    )


# --- determinism and the front door -------------------------------------------------------------


def small_model(x, t, y):
    out = 0.3 * x + 0.01 * y.view(-1, 1, 1, 1) + 1e-4 * t.view(-1, 1, 1, 1)
    return torch.cat([out, torch.tanh(x)], 1)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_sampling_is_deterministic_given_a_generator(method):
    d = create_diffusion("ddim20")
    kwargs = dict(y=torch.tensor([1, 2]))
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def run(seed, global_seed):
        torch.manual_seed(global_seed)  # must not matter
        g = torch.Generator().manual_seed(seed)
        return d.sample(
            small_model, noise, model_kwargs=kwargs, method=method, generator=g, eta=1.0
        )

    a, b, c = run(1, 10), run(1, 20), run(2, 10)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # The front door is the ADM loop with clip_denoised=False.
    loop, extra = (d.p_sample_loop, {}) if method == "ddpm" else (d.ddim_sample_loop, {"eta": 1.0})
    g = torch.Generator().manual_seed(1)
    expected = loop(
        small_model, noise.shape, noise, False, model_kwargs=kwargs, generator=g, **extra
    )
    assert torch.equal(a, expected)


def test_front_door_contract(capsys):
    d = create_diffusion("ddim10")
    assert GaussianDiffusion.sample_methods == ("ddpm", "ddim")
    noise = torch.randn(2, 3, 4, 4)
    kwargs = dict(y=torch.tensor([0, 1]))
    # DDIM with eta = 0 uses no randomness after x_T.
    first, second = (
        d.sample(small_model, noise, model_kwargs=kwargs, method="ddim", generator=g)
        for g in (torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    )
    assert torch.equal(first, second) and first.shape == noise.shape

    d.sample(small_model, noise, model_kwargs=kwargs, progress=True)
    assert "10/10" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown sampling method"):
        d.sample(small_model, noise, model_kwargs=kwargs, method="euler")

    # Drawing x_T itself also follows the generator.
    def draw_both(seed):
        g = torch.Generator().manual_seed(seed)
        return d.p_sample_loop(
            lambda x, t: small_model(x, t, kwargs["y"]), (2, 3, 4, 4), device="cpu", generator=g
        )

    assert torch.equal(draw_both(3), draw_both(3))
    assert not torch.equal(draw_both(3), draw_both(4))


def adm_loop(x, noises, respacing, method, eta=0.0):
    """ADM's p_sample_loop / ddim_sample_loop (guided-diffusion gaussian_diffusion.py) written
    out in float64 numpy from its formulas, on the respaced schedule, with the toy network
    (eps prediction, learned range) and the given per-step noises, no clipping (DiT's call)."""
    keep, abar, abar_prev = kept_schedule(respacing)
    beta = 1 - abar / abar_prev
    post_var = beta * (1 - abar_prev) / (1 - abar)
    post_log_clipped = np.log(np.append(post_var[1], post_var[1:]))
    for i in reversed(range(len(keep))):
        out = toy_output(x, np.full(len(x), float(keep[i])), x.shape[1], True, False)
        eps, v = out[:, : x.shape[1]], out[:, x.shape[1] :]
        x0 = np.sqrt(1 / abar[i]) * x - np.sqrt(1 / abar[i] - 1) * eps
        noise = noises[len(keep) - 1 - i]
        if method == "ddpm":
            coef1 = beta[i] * np.sqrt(abar_prev[i]) / (1 - abar[i])
            coef2 = (1 - abar_prev[i]) * np.sqrt(1 - beta[i]) / (1 - abar[i])
            frac = (v + 1) / 2
            log_var = frac * np.log(beta[i]) + (1 - frac) * post_log_clipped[i]
            x = coef1 * x0 + coef2 * x + (i > 0) * np.exp(0.5 * log_var) * noise
        else:
            eps = (np.sqrt(1 / abar[i]) * x - x0) / np.sqrt(1 / abar[i] - 1)
            sigma = eta * np.sqrt((1 - abar_prev[i]) / (1 - abar[i]) * (1 - abar[i] / abar_prev[i]))
            mean = x0 * np.sqrt(abar_prev[i]) + np.sqrt(1 - abar_prev[i] - sigma**2) * eps
            x = mean + (i > 0) * sigma * noise
    return x


@pytest.mark.parametrize(
    "respacing, method, eta", [("10", "ddpm", 0.0), ("ddim8", "ddim", 0.0), ("ddim8", "ddim", 0.7)]
)
def test_respaced_ddpm_and_ddim_loops_match_adms_formulas(respacing, method, eta):
    """The whole loop, every step: our samplers against ADM's update rules transcribed, with
    the same noise (drawn from the same generator in the same order)."""
    d = create_diffusion(respacing)
    x_T = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def model(x, t):
        return toy_output(x, t.double(), 2, True, False)

    got = d.sample(model, x_T, method=method, eta=eta, generator=torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    noises = [to_np(torch.randn(x_T.shape, generator=replay, dtype=x_T.dtype)) for _ in range(10)]
    expected = adm_loop(to_np(x_T), noises, respacing, method, eta)
    np.testing.assert_allclose(to_np(got), expected, rtol=1e-9, atol=1e-9)
