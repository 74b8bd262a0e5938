"""Train a DiT or SiT model (plain attention or VCA) in VAE latent space.

    python train.py --data-path synthetic --model SiT-S/2 --attention vca --vae none ...
    torchrun --nproc_per_node=8 train.py --data-path /data/imagenet/train --model DiT-XL/2 ...

See README.md for the ImageNet, multi-node, latent-cache and resume recipes.
"""

import signal

# Before the seconds of importing torch: a SIGTERM from then on ends in a checkpoint (the
# trainer installs its own handler once it exists and starts from this one's record).
EARLY_SIGTERM = []
if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: EARLY_SIGTERM.append(signum))

import argparse  # noqa: E402
import sys  # noqa: E402

from common.cli import ArgumentParser  # noqa: E402
from engine.loop import train_main  # noqa: E402
from engine.objective import add_objective_args, objective_from_args  # noqa: E402
from engine.sampling import add_sampler_args, sampler_from_args  # noqa: E402
from engine.train_config import TrainConfig, add_run_args, add_vca_args  # noqa: E402
from engine.trainer import Trainer  # noqa: E402
from models import ATTENTION_HELP, MODEL_NAMES, parse_model_name  # noqa: E402


def model_name(value: str) -> str:
    try:
        parse_model_name(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    g = parser.add_argument_group("data")
    g.add_argument(
        "--data-path",
        required=True,
        help="ImageFolder root (one folder per class), or 'synthetic' / 'synthetic:N' "
        "for the built-in shapes dataset (10 classes, no download)",
    )
    g.add_argument("--image-size", type=int, default=256, help="image side in pixels (default 256)")
    g.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="number of classes (default: from the dataset; 1000 for ImageNet)",
    )
    g.add_argument(
        "--vae",
        default="ema",
        help="latent codec: ema | mse (stabilityai/sd-vae-ft-*), a hub id, a local "
        "AutoencoderKL directory, or none for pixel space (default ema)",
    )
    g.add_argument(
        "--latent-cache",
        metavar="DIR",
        default=None,
        help="encode the dataset once into DIR (posterior mean/std of each image and "
        "its flip, all ranks in parallel) and train from it",
    )

    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        type=model_name,
        default="DiT-S/2",
        help=f"one of {', '.join(MODEL_NAMES)} (default DiT-S/2); DiT-* trains with "
        "DDPM, SiT-* with an interpolant flow",
    )
    g.add_argument(
        "--attention",
        choices=list(ATTENTION_HELP),
        default="mhsa",
        help="; ".join(f"{k}: {v}" for k, v in ATTENTION_HELP.items()),
    )
    add_vca_args(g, 8, "64 tokens")
    g.add_argument(
        "--learn-sigma",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="predict the variance channels too (default: on for DiT, off for SiT)",
    )
    g.add_argument(
        "--grad-checkpoint",
        action="store_true",
        help="recompute block activations in backward to save memory",
    )
    add_objective_args(parser)

    add_run_args(parser)

    g = parser.add_argument_group("previews")
    g.add_argument(
        "--sample-every",
        type=int,
        default=0,
        help="draw a preview grid from the EMA model every N steps (default 0: never)",
    )
    g.add_argument("--preview-count", type=int, default=16, help="images in a preview grid")
    g.add_argument(
        "--preview-cfg",
        type=float,
        default=1.0,
        help="guidance scale of the preview (default 1: none)",
    )
    add_sampler_args(parser, cfg_scale=None)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run the flags describe; a bad value is a UsageError naming the flag."""
    default_dir = f"results/{args.model.replace('/', '-')}-{args.attention}"
    family = parse_model_name(args.model)[0]
    return TrainConfig.from_args(
        args,
        results_dir=args.results_dir or default_dir,
        objective=objective_from_args(args, learn_sigma=args.learn_sigma is not False),
        sampler=sampler_from_args(family, args, cfg_scale=args.preview_cfg),
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return train_main(lambda: Trainer(config_from_args(args)), EARLY_SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
