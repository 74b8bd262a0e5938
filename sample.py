"""Draw class-conditional samples from a checkpoint into a PNG grid.

    python sample.py --ckpt DiT-XL-2-256x256.pt --class-labels 207 360 387 974 88 979 417 279 \\
        --cfg-scale 4.0 --out grid.png
    python sample.py --ckpt results/SiT-S-2-vca/checkpoints/0400000.pt --sampler sde \\
        --per-class 4 --save-each samples/

--ckpt takes our training checkpoints, safetensors files and the official DiT/SiT files (by
path, or by name: looked up in --ckpt-cache and downloaded there on first use). Image i's noise
depends only on (--seed, i), so the same flags give the same PNG bytes on the same machine.
"""

import argparse
import os
import sys

import numpy as np
import torch

from common import InputError, check_writable
from common.cli import ArgumentParser, report
from engine.errors import UsageError
from engine.images import make_grid, save_png
from engine.loading import CheckpointRequest, add_model_args, load_model
from engine.precision import apply_precision
from engine.sampling import (
    add_sampler_args,
    check_steps_and_guidance,
    sample_batches,
    sampler_from_args,
)

DIT_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's sample.py: ImageNet classes


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_model_args(parser, compile_default=False)
    g = parser.add_argument_group("output")
    g.add_argument(
        "--class-labels",
        type=int,
        nargs="+",
        default=None,
        metavar="Y",
        help="class ids to draw, in grid order (default: DiT's "
        f"{' '.join(map(str, DIT_LABELS))} for 1000-class models, else the first 8 classes)",
    )
    g.add_argument(
        "--per-class",
        type=int,
        default=1,
        metavar="K",
        help="images per label, each from its own noise (default 1)",
    )
    g.add_argument(
        "--nrow",
        type=int,
        default=None,
        help="images per grid row (default: --per-class when above 1, one row per label; "
        "else 4, as DiT's sample.py)",
    )
    g.add_argument("--out", default="sample.png", help="grid PNG path (default sample.png)")
    g.add_argument(
        "--save-each",
        metavar="DIR",
        default=None,
        help="also write every image as DIR/<index>-<label>.png",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="images per model batch (default 32; doubled by guidance); ddim and fixed-step "
        "ode give the same images at any batch size",
    )
    add_sampler_args(parser, cfg_scale=4.0)
    return parser


def class_labels(args: argparse.Namespace, num_classes: int) -> torch.Tensor:
    """The requested labels, each repeated --per-class times; out-of-range ids are refused."""
    labels = args.class_labels
    if labels is None:
        labels = DIT_LABELS if num_classes == 1000 else list(range(min(8, num_classes)))
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise UsageError(
            f"class label {bad[0]} is out of range: the model has {num_classes} classes, "
            f"so labels run from 0 to {num_classes - 1}"
        )
    return torch.tensor(labels).repeat_interleave(args.per_class)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("per_class", "batch_size", "nrow"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    try:
        check_writable(args.out, "--out", is_dir=False)
        if args.save_each:
            check_writable(args.save_each, "--save-each")
        check_steps_and_guidance(args.num_sampling_steps, args.cfg_scale)
        loaded = load_model(CheckpointRequest.from_args(args))
        apply_precision(loaded.precision)
        spec = sampler_from_args(loaded.family, args)
        objective = loaded.objective_for(spec)
        labels = class_labels(args, loaded.num_classes)
        batches = sample_batches(
            loaded.model,
            objective,
            spec,
            loaded.codec,
            labels,
            loaded.latent_shape,
            seed=args.seed,
            batch_size=args.batch_size,
            precision=loaded.precision,
            progress=sys.stderr.isatty(),
        )
        images = np.concatenate([batch for _, batch, _ in batches])
    except InputError as err:
        return report(err)
    nrow = args.nrow or (args.per_class if args.per_class > 1 else 4)
    save_png(make_grid(images, nrow), args.out)
    if args.save_each:
        for i, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
            save_png(image, os.path.join(args.save_each, f"{i:04d}-{label}.png"))
    print(f"wrote {args.out}: {len(images)} images by {spec.method}, {loaded.description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
