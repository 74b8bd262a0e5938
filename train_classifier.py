"""Train a timm image classifier (DeiT, Swin, PVT-v2) with its own attention, plain MHSA or VCA.

    python train_classifier.py --data-path synthetic:20000 --image-size 32 --patch-size 4 \\
        --model deit_tiny_patch16_224 --attention vca --contrast-grid 4 --max-steps 1000
    torchrun --nproc_per_node=8 train_classifier.py --data-path /data/imagenet/train \\
        --val-path /data/imagenet/val --model deit_tiny_patch16_224 --attention vca \\
        --warmup-steps 6255

DeiT's recipe by default (timm's AdamW, cosine schedule, label smoothing 0.1, Mixup 0.8 /
CutMix 1.0, RandAugment m9, random erasing 0.25, drop path 0.1, batch 1024 at lr 1e-3, 300
epochs), but for its warm-up: DeiT warms up for 5 epochs, while --warmup-steps is 0 unless
given (6255 steps are 5 epochs of ImageNet at batch 1024). Top-1/top-5 of the held-out set go
to the log and to eval.json in the run folder.
"""

import signal

# Before the seconds of importing torch: a SIGTERM from then on ends in a checkpoint.
EARLY_SIGTERM = []
if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: EARLY_SIGTERM.append(signum))

import argparse  # noqa: E402
import sys  # noqa: E402

from common.cli import ArgumentParser, from_flags  # noqa: E402
from engine.classification import ClassifierConfig, ClassifierTrainer  # noqa: E402
from engine.loop import train_main  # noqa: E402
from engine.train_config import add_run_args, add_vca_args  # noqa: E402
from models.attention import ATTENTION_HELP  # noqa: E402
from models.classifier import BACKBONES, CLASSIFIER_ATTENTIONS  # noqa: E402

DEFAULTS = ClassifierConfig(data_path="", results_dir="")


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    parser = ArgumentParser(
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = parser.add_argument_group("data")
    g.add_argument(
        "--data-path",
        required=True,
        help="ImageFolder root (one folder per class); or the built-in shapes, N renders: "
        "'synthetic[:N]' (classes are shape x colour pairs, up to 100) or 'synthetic-shape[:N]' "
        "(classes are the 10 shapes, each image in a random colour)",
    )
    g.add_argument(
        "--val-path",
        default=None,
        help="ImageFolder of held-out images for top-1/top-5, or held-out synthetic[-shape]:N "
        "renders labelled like --data-path (default: 2000 held-out renders for the built-in "
        "shapes, otherwise no evaluation)",
    )
    g.add_argument(
        "--image-size",
        type=int,
        default=d.image_size,
        help=f"image side in pixels (default {d.image_size})",
    )
    g.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes (default: the dataset's; 10 for the built-in shapes, up to 100 for "
        "synthetic, 10 for synthetic-shape)",
    )

    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        default=d.model,
        help=f"a timm ViT/DeiT, Swin or PVT-v2 name, e.g. {', '.join(BACKBONES)} "
        f"(default {d.model})",
    )
    g.add_argument(
        "--attention",
        choices=CLASSIFIER_ATTENTIONS,
        default=d.attention,
        help="native: timm's own attention; "
        + "; ".join(f"{k}: {v}" for k, v in ATTENTION_HELP.items()),
    )
    add_vca_args(g, d.contrast_grid, "DeiT's 14 x 14 patches pooled 4:1")
    g.add_argument(
        "--patch-size",
        type=int,
        default=None,
        help="ViT/DeiT patch size (default: the model's; 4 gives 64 tokens at 32 px)",
    )
    g.add_argument(
        "--drop-path",
        type=float,
        default=d.drop_path,
        help=f"stochastic depth rate (default {d.drop_path})",
    )
    g.add_argument(
        "--pretrained",
        default=None,
        metavar="hub|PATH",
        help="start from timm's weights (hub: downloaded; PATH: a timm state dict); "
        "the new attention parameters start fresh, the log names them",
    )

    g = parser.add_argument_group("recipe (DeiT's by default, but no warm-up)")
    g.add_argument(
        "--min-lr",
        type=float,
        default=d.min_lr,
        help=f"the cosine schedule's floor and warm-up start (default {d.min_lr:g})",
    )
    g.add_argument(
        "--warmup-steps",
        type=int,
        default=d.warmup_steps,
        help=f"linear warm-up steps (default {d.warmup_steps}; DeiT's is 5 epochs, 6255 steps "
        "of ImageNet at batch 1024)",
    )
    g.add_argument(
        "--label-smoothing",
        type=float,
        default=d.label_smoothing,
        help=f"(default {d.label_smoothing})",
    )
    g.add_argument(
        "--crop-scale",
        type=float,
        default=d.crop_scale,
        help="smallest area fraction of the random resized crop (default "
        f"{d.crop_scale}; a small object in a 32 px image needs more, e.g. 0.5)",
    )
    g.add_argument(
        "--mixup", type=float, default=d.mixup, help=f"Mixup alpha, 0 off (default {d.mixup})"
    )
    g.add_argument(
        "--cutmix", type=float, default=d.cutmix, help=f"CutMix alpha, 0 off (default {d.cutmix})"
    )
    g.add_argument(
        "--randaugment",
        default=d.randaugment,
        help=f"timm auto-augment spec, 'none' off (default {d.randaugment})",
    )
    g.add_argument(
        "--reprob",
        type=float,
        default=d.reprob,
        help=f"random erasing probability (default {d.reprob})",
    )
    g.add_argument(
        "--eval-every", type=int, default=0, help="evaluate every N steps (default 0: at the end)"
    )
    g.add_argument(
        "--eval-batch-size",
        type=int,
        default=d.eval_batch_size,
        help=f"evaluation batch per process (default {d.eval_batch_size})",
    )
    add_run_args(
        parser,
        compiles=False,  # the classifier trains eager: nothing reads --compile
        epochs=d.epochs,
        global_batch_size=d.global_batch_size,
        lr=d.lr,
        weight_decay=d.weight_decay,
        ema_decay=d.ema_decay,
        ckpt_every=1000,
    )
    return parser


def config_from_args(args: argparse.Namespace) -> ClassifierConfig:
    """The run the flags describe; a bad value is a UsageError naming the flag."""
    default_dir = f"results/classify-{args.model}-{args.attention}"
    randaugment = None if args.randaugment == "none" else args.randaugment
    return from_flags(
        ClassifierConfig, args, results_dir=args.results_dir or default_dir, randaugment=randaugment
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return train_main(lambda: ClassifierTrainer(config_from_args(args)), EARLY_SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
