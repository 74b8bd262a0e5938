"""FID-50K, sFID, Inception Score, precision and recall, as ADM's evaluator computes them.

    # sample 50k images from a checkpoint (8 GPUs), then evaluate against ADM's reference batch
    torchrun --nproc_per_node=8 evaluate_fid.py --ckpt DiT-XL-2-256x256.pt \\
        --ref VIRTUAL_imagenet256_labeled.npz --num-samples 50000 --cfg-scale 1.5
    # evaluate an existing sample file (ours, DiT's or ADM's arr_0 layout)
    python evaluate_fid.py --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz
    # reference statistics of your own dataset (ImageFolder, folder of images, or .npz)
    python evaluate_fid.py --make-ref my_ref.npz --images /data/my_dataset --image-size 256

Samples are keyed to their global index and written in resumable shards: rerun the same
command after an interruption and only the missing shards are drawn.
"""

import argparse
import json
import os
import sys

import torch

from data import DataError, iter_folder_images
from engine import dist
from engine.errors import UsageError
from engine.loading import add_model_args, load_model
from engine.precision import apply_precision
from engine.sample_set import generate_sample_set, merge_shards, write_settings
from engine.sampling import add_sampler_args, sampler_from_args, sampling_objective
from metrics import (
    InceptionFeatures,
    MetricsError,
    evaluate,
    iter_npz_array,
    load_reference,
    npz_array_info,
    write_reference,
)
from metrics.demo_classifier import demo_metrics, load_or_train
from models.codec import CodecError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_model_args(parser, cfg_scale=1.0, ckpt_required=False, precision="tf32")
    add_sampler_args(parser)
    g = parser.add_argument_group("sample set")
    g.add_argument("--num-samples", type=int, default=50_000, help="images to draw (default 50000)")
    g.add_argument(
        "--labels",
        choices=["uniform", "balanced"],
        default="uniform",
        help="uniform-random labels keyed to the sample index (DiT/ADM, default) or balanced "
        "(an equal number per class, e.g. 50 x 1000)",
    )
    g.add_argument("--batch-size", type=int, default=32, help="images per forward pass per process")
    g.add_argument(
        "--shard-size",
        type=int,
        default=1000,
        help="images per shard file, the unit of resumption (default 1000)",
    )
    g.add_argument(
        "--sample-dir",
        default=None,
        help="folder for the shards and samples.npz (default: fid-samples/<checkpoint>-<settings>)",
    )
    g = parser.add_argument_group("evaluation")
    g.add_argument(
        "--ref",
        default=None,
        help="reference statistics .npz in ADM's layout (mu, sigma, mu_s, sigma_s, arr_0), e.g. "
        "VIRTUAL_imagenet256_labeled.npz, or 'synthetic' for models of the built-in shapes: a "
        "small classifier's class accuracy and Frechet distance in its feature space (no "
        "download); without --ref only the samples are drawn",
    )
    g.add_argument(
        "--samples",
        default=None,
        help="evaluate this .npz (arr_0: uint8 N x H x W x 3) instead of sampling",
    )
    g.add_argument(
        "--inception-weights",
        default=None,
        metavar="PATH",
        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth for offline machines "
        "(default: downloaded on first use)",
    )
    g.add_argument("--eval-batch-size", type=int, default=100, help="images per Inception batch")
    g.add_argument(
        "--json", default=None, help="where to write the results (default: beside the samples)"
    )
    g = parser.add_argument_group("reference statistics")
    g.add_argument(
        "--make-ref",
        default=None,
        metavar="OUT.npz",
        help="compute reference statistics of --images and write them to OUT.npz",
    )
    g.add_argument(
        "--images",
        default=None,
        help="with --make-ref: an ImageFolder root, a folder of images (ADM's centre crop to "
        "--image-size), or an .npz with arr_0",
    )
    g.add_argument(
        "--ref-images",
        type=int,
        default=10_000,
        help="images kept in the reference's arr_0 for precision/recall (default 10000)",
    )
    return parser


def settings_of(args, loaded, spec) -> dict:
    """Everything that changes the sample set, recorded in the shards' folder and the JSON."""
    return {
        "checkpoint": loaded.path,
        "weights": args.weights,
        "model": loaded.name,
        "attention": loaded.attention,
        "image_size": loaded.image_size,
        "vae": loaded.vae,
        "num_classes": loaded.num_classes,
        "sampler": spec.describe(),
        "cfg_scale": args.cfg_scale,
        "cfg_channels": args.cfg_channels,
        "labels": args.labels,
        "seed": args.seed,
        "precision": loaded.precision,
        "num_samples": args.num_samples,
    }


def default_sample_dir(args, loaded, spec) -> str:
    stem = os.path.splitext(os.path.basename(loaded.path))[0]
    parts = [
        stem,
        args.weights,
        spec.method,
        str(spec.steps),
        f"cfg{args.cfg_scale:g}",
        args.labels,
        f"seed{args.seed}",
        f"n{args.num_samples}",
    ]
    return os.path.join("fid-samples", "-".join(parts))


def draw_samples(args, info) -> tuple[str, dict]:
    """Sample (all ranks), merge (rank 0); returns the samples.npz path and the settings."""
    loaded = load_model(args, info.device)
    apply_precision(loaded.precision)
    spec = sampler_from_args(loaded.family, args)
    objective = sampling_objective(loaded.family, loaded.objective, spec)
    settings = settings_of(args, loaded, spec)
    folder = args.sample_dir or default_sample_dir(args, loaded, spec)
    if info.is_main:
        write_settings(folder, settings)
    dist.barrier()
    generate_sample_set(
        loaded,
        objective,
        spec,
        loaded.codec,
        folder,
        num_samples=args.num_samples,
        seed=args.seed,
        labels=args.labels,
        cfg_scale=args.cfg_scale,
        cfg_channels=args.cfg_channels,
        precision=loaded.precision,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        rank=info.rank,
        world_size=info.world_size,
        progress=info.is_main,
    )
    dist.barrier()
    out = os.path.join(folder, "samples.npz")
    if info.is_main:
        merge_shards(folder, args.num_samples, args.shard_size, out)
        print(f"samples: {out}")
    return out, settings


def run_evaluation(args, samples_path: str, settings: dict) -> dict:
    shape, dtype = npz_array_info(samples_path)
    if len(shape) != 4 or shape[-1] != 3 or dtype != "uint8":
        raise MetricsError(
            f"{samples_path}: arr_0 is {dtype} {tuple(shape)}; samples must be uint8 N x H x W x 3"
        )
    if args.num_samples and args.samples is None and shape[0] != args.num_samples:
        raise MetricsError(f"{samples_path} holds {shape[0]} images, not {args.num_samples}")
    if args.ref == "synthetic":
        scorer = load_or_train(shape[1], settings.get("num_classes") or 10)
        images = iter_npz_array(samples_path, "arr_0", args.eval_batch_size)
        labels = iter_npz_array(samples_path, "arr_1", args.eval_batch_size)
        result = demo_metrics(zip(images, labels, strict=True), scorer)
    else:
        reference = load_reference(args.ref)
        extractor = InceptionFeatures(args.inception_weights, device=device_for(args))
        batches = iter_npz_array(samples_path, batch_size=args.eval_batch_size)
        result = evaluate(batches, reference, extractor, progress=sys.stderr.isatty())
    report = {"samples": samples_path, "reference": args.ref, **settings, "metrics": result}
    json_path = args.json or os.path.splitext(samples_path)[0] + "-metrics.json"
    with open(json_path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(json_path + ".tmp", json_path)
    print_table(result, json_path)
    return report


def print_table(result: dict, json_path: str) -> None:
    names = {
        "fid": "FID",
        "sfid": "sFID",
        "inception_score": "Inception Score",
        "precision": "Precision",
        "recall": "Recall",
        "class_accuracy": "class accuracy (demo classifier)",
        "real_accuracy": "class accuracy of real images",
        "frechet_distance": "Frechet distance (demo classifier features)",
        "num_samples": "samples",
    }
    print("| metric | value |\n|---|---|")
    for key, name in names.items():
        if key not in result:
            continue
        value = result[key]
        text = "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else value)
        print(f"| {name} | {text} |")
    print(f"results: {json_path}")


def make_reference(args) -> None:
    extractor = InceptionFeatures(args.inception_weights, device=device_for(args))
    if args.images.endswith(".npz"):
        batches = iter_npz_array(args.images, batch_size=args.eval_batch_size)
    elif args.image_size is None:
        raise UsageError("--make-ref from an image folder needs --image-size (e.g. 256)")
    else:
        batches = iter_folder_images(args.images, args.image_size, args.eval_batch_size)
    write_reference(
        batches, args.make_ref, extractor, keep_images=args.ref_images, progress=sys.stderr.isatty()
    )
    print(f"reference statistics: {args.make_ref}")


def device_for(args) -> torch.device:
    if args.device:
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.make_ref:
            if not args.images:
                raise UsageError("--make-ref needs --images (an image folder or an .npz)")
            make_reference(args)
            return 0
        if args.samples:
            if not args.ref:
                raise UsageError("--samples needs --ref to evaluate against")
            run_evaluation(args, args.samples, {"num_samples": None})
            return 0
        if not args.ckpt:
            raise UsageError("give --ckpt to sample (and --ref to evaluate), or --samples")
        info = dist.setup(args.device)
        samples_path, settings = draw_samples(args, info)
        if args.ref and info.is_main:
            run_evaluation(args, samples_path, settings)
        dist.cleanup()
    except (UsageError, DataError, CodecError, MetricsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
