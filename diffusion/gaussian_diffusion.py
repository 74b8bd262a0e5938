"""Gaussian diffusion (DDPM) as in ADM/DiT: the training objective and the DDPM and DDIM samplers.

Schedules are float64 numpy arrays; per-timestep values are gathered into tensors of at least
float32 (float64 for float64 inputs), so float32 results are those of ADM's guided-diffusion.
A respaced process keeps ᾱ at a subset of the original timesteps; the model is always called
with the original timestep indices.
"""

import math

import numpy as np
import torch
from tqdm.auto import tqdm

MEAN_TYPES = ("epsilon", "start_x")
VAR_TYPES = ("learned_range", "fixed_small", "fixed_large")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")


def mean_flat(x):
    return x.mean(dim=list(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    # ADM's tanh approximation of Φ; kept so decoder likelihoods match its numbers.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-probability (nats) of 8-bit data scaled to [-1, 1] under a Gaussian discretised to
    bins of width 2/255; the two edge bins extend to ±infinity."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )


def _randn(like, generator):
    """Noise shaped like `like`. A list of generators draws row i from generator[i % len] (on
    that generator's device), so a sample's noise does not depend on the batch it is in."""
    if isinstance(generator, (list, tuple)):
        rows = [_randn(row, generator[i % len(generator)]) for i, row in enumerate(like)]
        return torch.stack(rows).to(like.device)
    device = like.device if generator is None else generator.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(
        like.device
    )


def _extract(arr, t, like):
    """arr[t] as a tensor that broadcasts against `like` (B, ...)."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    values = torch.from_numpy(arr).to(device=t.device)[t].to(dtype)
    return values.view(-1, *([1] * (like.dim() - 1)))


class GaussianDiffusion:
    """DDPM over the timesteps `use_timesteps` (default: all) of the process given by `betas`.

    model_mean_type: "epsilon" or "start_x" (what the network predicts).
    model_var_type: "learned_range" (network also outputs v in [-1, 1], interpolating the
        log-variance between the posterior variance and beta), "fixed_small" (posterior
        variance) or "fixed_large" (beta).
    loss_type: "mse" (plus the VLB for a learned variance), "rescaled_mse" (VLB scaled by
        num_timesteps / 1000), "kl" (VLB only) or "rescaled_kl" (VLB times num_timesteps).
    """

    sample_methods = ("ddpm", "ddim")

    def __init__(
        self,
        *,
        betas,
        use_timesteps=None,
        model_mean_type="epsilon",
        model_var_type="learned_range",
        loss_type="mse",
    ):
        for value, allowed in (
            (model_mean_type, MEAN_TYPES),
            (model_var_type, VAR_TYPES),
            (loss_type, LOSS_TYPES),
        ):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        base_betas = np.asarray(betas, dtype=np.float64)
        if base_betas.ndim != 1 or not ((base_betas > 0) & (base_betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.original_num_steps = len(base_betas)
        if use_timesteps is None:
            use_timesteps = range(self.original_num_steps)
        self.timestep_map = sorted(set(use_timesteps))
        self.use_timesteps = set(self.timestep_map)
        if len(self.timestep_map) < 2 or not (
            self.timestep_map[0] >= 0 and self.timestep_map[-1] < self.original_num_steps
        ):
            raise ValueError("use_timesteps must hold at least 2 steps in [0, len(betas))")

        # Skipping steps: choose the new betas so ᾱ at every kept step is unchanged.
        kept_alphas_cumprod = np.cumprod(1.0 - base_betas)[self.timestep_map]
        betas = 1.0 - kept_alphas_cumprod / np.append(1.0, kept_alphas_cumprod[:-1])
        self.betas = betas
        self.num_timesteps = len(betas)
        self._set_coefficients(betas)

    def _set_coefficients(self, betas):
        """ᾱ and the q / posterior coefficients of `betas`, as ADM precomputes them."""
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # Posterior q(x_{t-1} | x_t, x_0). Its variance is 0 at t = 0, so the log is clipped
        # to the t = 1 value there.
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        self.log_betas = np.log(betas)
        # "Large" uses the posterior variance at t = 0 for a better decoder likelihood.
        large = np.append(self.posterior_variance[1], betas[1:])
        self.fixed_variances = {
            "fixed_small": (self.posterior_variance, self.posterior_log_variance_clipped),
            "fixed_large": (large, np.log(large)),
        }

    # --- the forward process -------------------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = _extract(1.0 - self.alphas_cumprod, t, x_start).expand(x_start.shape)
        log_variance = _extract(self.log_one_minus_alphas_cumprod, t, x_start).expand(x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0), with the given standard-normal noise if any."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            _extract(self.posterior_mean_coef1, t, x_t) * x_start
            + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = _extract(self.posterior_variance, t, x_t).expand(x_t.shape)
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t).expand(x_t.shape)
        return mean, variance, log_variance

    # --- the model's reverse step ----------------------------------------------------------------

    def _model_timesteps(self, t):
        return torch.tensor(self.timestep_map, device=t.device, dtype=t.dtype)[t]

    def _call_model(self, model, x, t, model_kwargs):
        return model(x, self._model_timesteps(t), **(model_kwargs or {}))

    def _split_output(self, output, x):
        """(mean prediction, variance values or None) from the raw model output."""
        if self.model_var_type != "learned_range":
            if output.shape != x.shape:
                raise ValueError(f"model output {tuple(output.shape)} != input {tuple(x.shape)}")
            return output, None
        channels = x.shape[1]
        if output.shape != (x.shape[0], 2 * channels, *x.shape[2:]):
            raise ValueError(
                f"learn_sigma expects the model to return {2 * channels} channels (prediction, "
                f"then variance values); got output of shape {tuple(output.shape)}"
            )
        return torch.split(output, channels, dim=1)

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """p(x_{t-1} | x_t) from the model: dict of mean, variance, log_variance, pred_xstart.

        denoised_fn is applied to the x_0 prediction before the optional clip to [-1, 1].
        """
        output = self._call_model(model, x, t, model_kwargs)
        return self._p_from_output(output, x, t, clip_denoised, denoised_fn)

    def _p_from_output(self, output, x, t, clip_denoised=False, denoised_fn=None):
        prediction, var_values = self._split_output(output, x)
        if var_values is None:
            variance, log_variance = self.fixed_variances[self.model_var_type]
            variance = _extract(variance, t, x).expand(x.shape)
            log_variance = _extract(log_variance, t, x).expand(x.shape)
        else:
            min_log = _extract(self.posterior_log_variance_clipped, t, x)
            max_log = _extract(self.log_betas, t, x)
            frac = (var_values + 1) / 2  # v = -1: posterior variance, v = 1: beta
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)

        if self.model_mean_type == "start_x":
            pred_xstart = prediction
        else:
            pred_xstart = self._predict_xstart_from_eps(x, t, prediction)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        sqrt_recip = _extract(self.sqrt_recip_alphas_cumprod, t, x_t)
        sqrt_recipm1 = _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)
        return (sqrt_recip * x_t - pred_xstart) / sqrt_recipm1

    # --- training ------------------------------------------------------------------------------

    def _vb_terms_bpd(self, output, x_start, x_t, t):
        """One VLB term in bits per dimension: the decoder NLL at t = 0, else
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        p = self._p_from_output(output, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=p["mean"], log_scales=0.5 * p["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(self, model, x_start, t=None, model_kwargs=None, noise=None):
        """Per-example losses {"loss", and for MSE losses "mse" (+ "vb" with learned sigma)}.

        t (indices into this process's timesteps) is drawn uniformly when not given.
        """
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x_start.shape[0],), device=x_start.device)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        output = self._call_model(model, x_t, t, model_kwargs)

        if self.loss_type in ("kl", "rescaled_kl"):
            loss = self._vb_terms_bpd(output, x_start, x_t, t)
            if self.loss_type == "rescaled_kl":
                loss = loss * self.num_timesteps
            return {"loss": loss}

        prediction, var_values = self._split_output(output, x_t)
        terms = {}
        if var_values is not None:
            # The VLB trains only the variance: the mean is fitted by the MSE alone.
            frozen = torch.cat([prediction.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(frozen, x_start, x_t, t)
            if self.loss_type == "rescaled_mse":
                # ADM's scale, so the VLB does not swamp the MSE.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = x_start if self.model_mean_type == "start_x" else noise
        terms["mse"] = mean_flat((target - prediction) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # --- sampling ------------------------------------------------------------------------------

    def p_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        generator=None,
    ):
        """One ancestral step x_t -> x_{t-1}: dict of sample, pred_xstart. Noise is drawn at
        every step, the last included, so the random stream is ADM's."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = _randn(x, generator)
        nonzero = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))  # no noise on the last step
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        eta=0.0,
        generator=None,
    ):
        """One DDIM step (Song et al., eq. 12); eta = 0 is deterministic, eta = 1 is DDPM-like."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        # Re-derived so clipping and x_0-prediction models are handled alike.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract(self.alphas_cumprod, t, x)
        alpha_bar_prev = _extract(self.alphas_cumprod_prev, t, x)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        noise = _randn(x, generator)
        mean = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
            + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        nonzero = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        sample = mean + nonzero * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        generator=None,
    ):
        """Ancestral sampling from x_T = noise (drawn if None) to x_0."""
        for out in self.p_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            generator=generator,
        ):
            sample = out["sample"]
        return sample

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        generator=None,
    ):
        """Yield p_sample's dict at every step, from t = T - 1 down to 0."""
        yield from self._loop(
            self.p_sample,
            model,
            shape,
            noise,
            device,
            progress,
            generator,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        generator=None,
    ):
        """DDIM sampling from x_T = noise (drawn if None) to x_0."""
        for out in self.ddim_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            eta=eta,
            generator=generator,
        ):
            sample = out["sample"]
        return sample

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        generator=None,
    ):
        """Yield ddim_sample's dict at every step, from t = T - 1 down to 0."""
        yield from self._loop(
            self.ddim_sample,
            model,
            shape,
            noise,
            device,
            progress,
            generator,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
            eta=eta,
        )

    def _loop(self, step, model, shape, noise, device, progress, generator, **step_kwargs):
        if device is None:
            device = noise.device if noise is not None else next(model.parameters()).device
        if noise is None:
            noise = torch.randn(*shape, device=device, generator=generator)
        x = noise
        indices = range(self.num_timesteps - 1, -1, -1)
        if progress:
            indices = tqdm(indices)
        for i in indices:
            t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = step(model, x, t, generator=generator, **step_kwargs)
            yield out
            x = out["sample"]

    def sample(
        self,
        model_fn,
        noise,
        *,
        model_kwargs=None,
        method="ddpm",
        progress=False,
        generator=None,
        eta=0.0,
        clip_denoised=False,
    ):
        """The sampling front door shared with transport/: x_0 from x_T = noise.

        method "ddpm" (ancestral) or "ddim" (eta only applies to it). The generator, if any,
        must live on noise's device.
        """
        common = dict(
            noise=noise,
            clip_denoised=clip_denoised,
            model_kwargs=model_kwargs,
            device=noise.device,
            progress=progress,
            generator=generator,
        )
        if method == "ddpm":
            return self.p_sample_loop(model_fn, noise.shape, **common)
        if method == "ddim":
            return self.ddim_sample_loop(model_fn, noise.shape, eta=eta, **common)
        raise ValueError(f"unknown sampling method {method!r}: use one of {self.sample_methods}")
