"""DDPM objective and samplers, numerically matching ADM's guided-diffusion as used by DiT."""

from .gaussian_diffusion import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from .schedule import betas_for_alpha_bar, get_named_beta_schedule, space_timesteps

__all__ = [
    "GaussianDiffusion",
    "betas_for_alpha_bar",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
]


def create_diffusion(
    timestep_respacing="",
    noise_schedule="linear",
    use_kl=False,
    sigma_small=False,
    predict_xstart=False,
    learn_sigma=True,
    rescale_learned_sigmas=False,
    diffusion_steps=1000,
):
    """DiT's diffusion factory; the defaults are DiT's training setup.

    timestep_respacing: "" or None for all steps, else "N", "N1,N2,..." or "ddimN" (see
    space_timesteps), e.g. "250" for DiT's sampling.
    """
    if use_kl:
        loss_type = "rescaled_kl"
    elif rescale_learned_sigmas:
        loss_type = "rescaled_mse"
    else:
        loss_type = "mse"
    var_type = "learned_range" if learn_sigma else ("fixed_small" if sigma_small else "fixed_large")
    if not timestep_respacing:
        timestep_respacing = [diffusion_steps]
    return GaussianDiffusion(
        betas=get_named_beta_schedule(noise_schedule, diffusion_steps),
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        model_mean_type="start_x" if predict_xstart else "epsilon",
        model_var_type=var_type,
        loss_type=loss_type,
    )
