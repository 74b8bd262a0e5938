"""The paper's tables as data: which (model, attention) cells, and at which scale.

At demo scale the tiny T width trains on the built-in shapes in pixel space at 32 px with patch
4: 64 tokens, and a 4 x 4 contrast grid keeps the paper's compression (N / n = 4, as DiT-S/2's
256 tokens pooled to 8 x 8). Both objectives run: DiT (DDPM) and SiT (flow). At ImageNet scale
the cells are the paper's models with its recipe (400K steps, batch 256, FID-50K at cfg 1).

The classification table trains timm backbones with train_classifier.py, which scores its own
held-out set (eval.json). At demo scale a DeiT-T-shaped model sees the built-in shapes at 32 px
in 10 classes (the shapes, in random colours) with patch 4: 64 tokens and a 4 x 4 grid, DeiT-T's
N/n = 4 at 224 px with a 7 x 7 grid; at ImageNet scale, DeiT's recipe for 300 epochs."""

from dataclasses import dataclass, field

from models.classifier import BACKBONES


@dataclass(frozen=True)
class Scale:
    """Everything a cell's runs share at one scale."""

    train: tuple[str, ...]  # the training script's flags beside --model/--attention/--global-seed
    evaluate: tuple[str, ...] | None  # evaluate_fid.py flags beside --ckpt/--seed; None: the
    steps: int  # training script evaluates (train_classifier.py)
    models: dict = field(default_factory=dict)  # the paper's model -> the one run at this scale
    samplers: dict = field(default_factory=dict)  # family -> evaluate_fid.py sampler flags
    objectives: dict = field(default_factory=dict)  # family -> train.py objective flags
    script: str = "train.py"


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
           "--latent-cache", "/data/imagenet-latents",
           "--keep-checkpoints", "0"),  # every checkpoint, for FID-over-training curves
    evaluate=("--ref", "VIRTUAL_imagenet256_labeled.npz", "--num-samples", "50000",
              "--cfg-scale", "1.0"),
    steps=400_000,
)  # fmt: skip
CLASSIFY_DEMO = Scale(
    script="train_classifier.py",
    # Shape alone (colour random): with shape x colour classes both models learned the colour
    # in 400 steps and stalled at chance among the shapes. DeiT's Mixup/CutMix, RandAugment,
    # erasing and 8% crops kept a from-scratch DeiT-T at chance for 200 steps even on shapes
    # alone; without them, half-area crops and lr 3e-4, it reached 0.32 top-1 at step 200.
    train=("--data-path", "synthetic-shape:20000", "--val-path", "synthetic-shape:1000",
           "--image-size", "32", "--patch-size", "4", "--contrast-grid", "4",
           "--global-batch-size", "32", "--lr", "3e-4", "--warmup-steps", "30",
           "--crop-scale", "0.5", "--mixup", "0", "--cutmix", "0", "--randaugment", "none",
           "--reprob", "0", "--drop-path", "0",
           "--num-workers", "0", "--log-every", "50", "--no-tensorboard"),
    evaluate=None,
    steps=400,
    models={"deit_tiny_patch16_224": "deit_tiny_patch16_224"},
)  # fmt: skip

CLASSIFY_IMAGENET = Scale(
    script="train_classifier.py",
    train=("--data-path", "/data/imagenet/train", "--val-path", "/data/imagenet/val",
           "--image-size", "224", "--global-batch-size", "1024", "--lr", "1e-3",
           "--warmup-steps", "6255", "--num-workers", "10"),  # 5 of DeiT's 300 epochs
    evaluate=None,
    steps=375_300,  # 300 epochs of 1,281,167 images at batch 1024
)  # fmt: skip


@dataclass(frozen=True)
class Table:
    baseline: str  # the attention every other one is compared with
    pairs: list  # (paper model, attention)
    scales: dict  # scale name -> Scale


GENERATION = {"demo": DEMO, "imagenet": IMAGENET}
TABLES = {
    "paper-main": Table(
        "mhsa",
        [(model, attention) for model in ("DiT-S/2", "DiT-S/4", "DiT-B/2", "SiT-S/2", "SiT-B/2")
         for attention in ("mhsa", "vca")],
        GENERATION,
    ),
    # The paper's rows: Stage I only, Stage II only, its two-stage vanilla Differential
    # Attention ("diff"), embeddings only, the full VCA; with Ye et al.'s quadratic Differential
    # Attention beside them. Each row is read against the full VCA: what removing a part costs.
    "paper-ablation": Table(
        "vca",
        [("DiT-S/2", attention)
         for attention in ("stage1", "stage2", "diff", "diffattn", "emb", "vca")],
        GENERATION,
    ),
    # "native" is timm's own attention: DeiT's MHSA, Swin's windows, PVT-v2's spatial reduction
    "paper-classification": Table(
        "native",
        [(model, attention) for model in BACKBONES for attention in ("native", "vca")],
        {"demo": CLASSIFY_DEMO, "imagenet": CLASSIFY_IMAGENET},
    ),
}  # fmt: skip
SCALES = ("demo", "imagenet")


def cells(table: str, scale: Scale) -> list[tuple[str, str]]:
    """The (model, attention) pairs run at `scale`: at demo scale each paper model maps to its
    stand-in, and models without one (the /4 and B widths) are left out."""
    pairs = TABLES[table].pairs
    if not scale.models:
        return pairs
    return sorted({(scale.models[m], a) for m, a in pairs if m in scale.models})
