"""The paper's generation tables as data: which (model, attention) cells, and at which scale.

At demo scale the tiny T width trains on the built-in shapes in pixel space at 32 px with patch
4: 64 tokens, and a 4 x 4 contrast grid keeps the paper's compression (N / n = 4, as DiT-S/2's
256 tokens pooled to 8 x 8). Both objectives run: DiT (DDPM) and SiT (flow). At ImageNet scale
the cells are the paper's models with its recipe (400K steps, batch 256, FID-50K at cfg 1)."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Scale:
    """Everything a cell's runs share at one scale."""

    train: tuple[str, ...]  # train.py flags beside --model/--attention/--global-seed
    evaluate: tuple[str, ...]  # evaluate_fid.py flags beside --ckpt/--seed
    steps: int
    models: dict = field(default_factory=dict)  # the paper's model -> the one run at this scale
    samplers: dict = field(default_factory=dict)  # family -> evaluate_fid.py sampler flags
    objectives: dict = field(default_factory=dict)  # family -> train.py objective flags


DEMO = Scale(
    train=("--data-path", "synthetic:20000", "--image-size", "32", "--vae", "none",
           "--global-batch-size", "32", "--lr", "2e-3", "--ema-decay", "0.995", "--num-workers",
           "0", "--log-every", "100", "--contrast-grid", "4", "--no-tensorboard"),
    evaluate=("--ref", "synthetic", "--num-samples", "500", "--batch-size", "100",
              "--cfg-scale", "2.0"),
    steps=700,
    models={"DiT-S/2": "DiT-T/4", "SiT-S/2": "SiT-T/4"},
    # DDPM's linear schedule leaves DiT at 0.13 class accuracy after 700 steps at 32 px, the
    # cosine one (improved DDPM's choice for low resolutions) at 0.17; SiT reaches 0.5.
    objectives={"DiT": ("--noise-schedule", "cosine")},
    # DDPM's 250 steps take 15 min per 1000 images here; DDIM 25 and a 12-step Heun ODE, 2-3.
    samplers={"DiT": ("--sampler", "ddim", "--num-sampling-steps", "25"),
              "SiT": ("--sampler", "ode", "--ode-method", "heun", "--num-sampling-steps", "13")},
)  # fmt: skip
IMAGENET = Scale(
    train=("--data-path", "/data/imagenet/train", "--image-size", "256", "--vae", "ema",
           "--global-batch-size", "256", "--lr", "1e-4", "--ema-decay", "0.9999",
           "--latent-cache", "/data/imagenet-latents"),
    evaluate=("--ref", "VIRTUAL_imagenet256_labeled.npz", "--num-samples", "50000",
              "--cfg-scale", "1.0"),
    steps=400_000,
)  # fmt: skip
SCALES = {"demo": DEMO, "imagenet": IMAGENET}

# table -> (baseline attention, [(paper model, attention), ...])
TABLES = {
    "paper-main": (
        "mhsa",
        [(model, attention) for model in ("DiT-S/2", "DiT-S/4", "DiT-B/2", "SiT-S/2", "SiT-B/2")
         for attention in ("mhsa", "vca")],
    ),
    "paper-ablation": (
        "diffattn",
        [("DiT-S/2", attention) for attention in ("stage1", "stage2", "diffattn", "emb", "vca")],
    ),
}  # fmt: skip


def cells(table: str, scale: Scale) -> list[tuple[str, str]]:
    """The (model, attention) pairs run at `scale`: at demo scale each paper model maps to its
    stand-in, and models without one (the /4 and B widths) are left out."""
    _, pairs = TABLES[table]
    if not scale.models:
        return pairs
    return sorted({(scale.models[m], a) for m, a in pairs if m in scale.models})
