"""Interpolant-flow (SiT) objective and samplers: `create_transport(...)`, `Sampler(transport)`."""

from .path import DIFFUSION_FORMS, PATHS, PREDICTIONS, GVPPath, LinearPath, Path, VPPath
from .sampler import ODE_METHODS, Sampler, bits_per_dim
from .transport import Transport, create_transport

__all__ = [
    "DIFFUSION_FORMS",
    "ODE_METHODS",
    "PATHS",
    "PREDICTIONS",
    "GVPPath",
    "LinearPath",
    "Path",
    "Sampler",
    "Transport",
    "VPPath",
    "bits_per_dim",
    "create_transport",
]
