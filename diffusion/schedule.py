"""Noise schedules and timestep respacing, matching ADM's conventions."""

import math

import numpy as np

# "cosine" is the name train.py's --noise-schedule offers; diffusers calls it squaredcos_cap_v2.
NOISE_SCHEDULES = ("linear", "squaredcos_cap_v2", "cosine")


def get_named_beta_schedule(name, num_diffusion_timesteps):
    """Betas for "linear" (Ho et al., rescaled so any step count spans the same ᾱ range) or
    "squaredcos_cap_v2" alias "cosine" (Nichol & Dhariwal's cosine schedule)."""
    if name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if name in ("squaredcos_cap_v2", "cosine"):
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(f"unknown noise schedule {name!r}: use one of {', '.join(NOISE_SCHEDULES)}")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Discretise a continuous ᾱ(t), t in [0, 1]; betas are capped so ᾱ never reaches 0."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas)


def space_timesteps(num_timesteps, section_counts):
    """The set of original timesteps kept by a respacing spec.

    `section_counts` is "N", "N1,N2,..." (the process is cut into equal sections, each strided
    to its count, first and last step of a section included) or "ddimN" (one integer stride
    from 0, as in the DDIM paper). A list of counts is also accepted.
    """
    spec = section_counts
    if isinstance(spec, str):
        if spec.startswith("ddim"):
            count = _parse_count(spec[len("ddim") :], spec)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"timestep_respacing {spec!r}: no integer stride gives exactly {count} of "
                f"{num_timesteps} steps"
            )
        section_counts = [_parse_count(part, spec) for part in spec.split(",")]

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(
                f"timestep_respacing {spec!r}: cannot take {count} steps from a section of {size}"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0  # accumulated, not j * stride: ADM's rounding depends on it
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    if len(set(steps)) < 2:
        raise ValueError(f"timestep_respacing {spec!r}: keep at least 2 steps")
    return set(steps)


def _parse_count(text, spec):
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"invalid timestep_respacing {spec!r}: expected 'N', 'N1,N2,...' or 'ddimN'"
        ) from None
