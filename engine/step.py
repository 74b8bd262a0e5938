"""One training step, shared by train.py's loop and bench.train_step, so the benchmark times the
code that trains and the two recipes it compares differ only in their settings."""

import torch

from .ema import update_ema
from .precision import autocast_context


def batch_latents(batch, codec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, labels) on the device from a loader batch: (images, labels), encoded by the
    codec, or (mean, std, labels) from the latent cache, each row holding the posterior of the
    image and of its mirror image. The flip and the posterior sample come from the global RNG,
    which the trainer reseeds at every step."""
    if len(batch) == 3:
        mean, std, labels = batch
        mean, std = mean.to(device), std.to(device)
        flip = torch.randint(2, (mean.shape[0],), device=device)
        rows = torch.arange(mean.shape[0], device=device)
        mean, std = mean[rows, flip], std[rows, flip]
    else:
        images, labels = batch
        images = images.to(device, non_blocking=True)
        flip = torch.rand(images.shape[0], device=device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        mean, std = codec.posterior(images)
    latents = mean + std * torch.randn_like(mean)
    return latents, labels.to(device, non_blocking=True)


def create_optimizer(model, lr: float, weight_decay: float = 0.0, fused: bool = True):
    """AdamW. fused=True runs one kernel over all parameters (CUDA and, since torch 2.4, CPU);
    fused=False is DiT's per-parameter loop (no foreach either), the reference recipe."""
    return torch.optim.AdamW(
        model.parameters(),
        lr=lr,
        weight_decay=weight_decay,
        fused=fused,
        foreach=None if fused else False,
    )


class TrainStep:
    """Loss under autocast, backward (loss-scaled for fp16), gradient norm and clipping, AdamW,
    EMA. `network` is what the forward pass calls: the model itself, its DDP wrapper, or either
    compiled; the optimizer, clipping and EMA always see the plain `model`.

    grad_clip: None computes no gradient norm (DiT's recipe); 0 measures it without clipping;
    a positive value clips to it."""

    def __init__(
        self,
        model: torch.nn.Module,
        network,
        objective,
        optimizer: torch.optim.Optimizer,
        ema: torch.nn.Module,
        *,
        precision: str,
        ema_decay: float,
        grad_clip: float | None = 0.0,
    ):
        self.model, self.network, self.objective = model, network, objective
        self.optimizer, self.ema, self.ema_decay = optimizer, ema, ema_decay
        self.precision, self.grad_clip = precision, grad_clip
        device = next(model.parameters()).device
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def __call__(self, latents: torch.Tensor, labels: torch.Tensor):
        """(loss, grad norm or None), both still on the device: no synchronisation here."""
        with autocast_context(self.precision, self.device):
            losses = self.objective.training_losses(
                self.network, latents, model_kwargs={"y": labels}
            )
        loss = losses["loss"].float().mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        grad_norm = None
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        update_ema(self.ema, self.model, self.ema_decay)
        return loss.detach(), grad_norm
