"""Exponential moving average of the model's weights (DiT keeps it in fp32 beside the model)."""

import copy

import torch


def create_ema(model: torch.nn.Module) -> torch.nn.Module:
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float = 0.9999):
    """ema = decay * ema + (1 - decay) * model, for every parameter (DiT has no buffers)."""
    ema_params = dict(ema.named_parameters())
    model_params = list(model.named_parameters())
    targets = [ema_params[name] for name, _ in model_params]
    sources = [p.detach() for _, p in model_params]
    torch._foreach_lerp_(targets, sources, 1 - decay)
