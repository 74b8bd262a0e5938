"""FID-50K, sFID, Inception Score, precision and recall, as ADM's evaluator computes them.

    # sample 50k images from a checkpoint (8 GPUs), then evaluate against ADM's reference batch;
    # --cfg-channels 3 is DiT's own guidance rule, which its published FIDs use
    torchrun --nproc_per_node=8 evaluate_fid.py --ckpt DiT-XL-2-256x256.pt \\
        --ref VIRTUAL_imagenet256_labeled.npz --num-samples 50000 --cfg-scale 1.5 --cfg-channels 3
    # evaluate an existing sample file (ours, DiT's or ADM's arr_0 layout)
    python evaluate_fid.py --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz
    # reference statistics of your own dataset (ImageFolder, folder of images, or .npz)
    python evaluate_fid.py --make-ref my_ref.npz --images /data/my_dataset --image-size 256

Samples are keyed to their global index and written in resumable shards: rerun the same
command after an interruption and only the missing shards are drawn.
"""

import argparse
import os
import sys

from common import InputError, check_writable, iter_npz_array, npz_array_info
from common.cli import ArgumentParser, report
from common.npz import NpzError
from data import iter_folder_images
from engine import dist
from engine.errors import UsageError
from engine.loading import CheckpointRequest, add_model_args, load_model
from engine.precision import apply_precision
from engine.sample_set import SampleSetConfig, add_sample_set_args, draw_sample_set
from engine.sampling import add_sampler_args, check_steps_and_guidance, sampler_from_args
from metrics import (
    InceptionFeatures,
    evaluate_file,
    load_reference,
    write_reference,
    write_report,
)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_model_args(parser, ckpt_required=False, precision="tf32")
    add_sampler_args(parser, cfg_scale=1.0)
    add_sample_set_args(parser)
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
        "--pr-distances",
        choices=["float16", "float32"],
        default="float16",
        help="precision/recall distances: float16 as ADM's evaluator computes them (default; "
        "what published values used) or exact float32 (about 2e-3 lower); recorded in the JSON",
    )
    g.add_argument(
        "--json", default=None, help="where to write the results (default: beside the samples)"
    )
    g.add_argument(
        "--tensorboard-dir",
        metavar="DIR",
        default=None,
        help="also write the metrics as TensorBoard scalars (eval/fid, ...) at the checkpoint's "
        "training step, e.g. into the run folder to plot FID against steps",
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


def score(args, reference, samples_path: str, settings: dict, step: int | None = None) -> None:
    """Metrics of the samples against `reference` (a Reference, or "synthetic"), printed as a
    table and written beside them as JSON (and as TensorBoard scalars at `step` with
    --tensorboard-dir)."""
    result = evaluate_file(
        samples_path,
        reference,
        num_classes=settings.get("num_classes"),
        expected_count=settings.get("num_samples"),
        inception_weights=args.inception_weights,
        device=dist.resolve_device(args.device),
        batch_size=args.eval_batch_size,
        progress=sys.stderr.isatty(),
        pr_distances=args.pr_distances,
    )
    report = {"samples": samples_path, "reference": args.ref, **settings, "metrics": result}
    json_path = args.json or os.path.splitext(samples_path)[0] + "-metrics.json"
    print(write_report(report, json_path))
    print(f"results: {json_path}")
    if args.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(args.tensorboard_dir) as writer:
            for key, value in result.items():
                if isinstance(value, float):
                    writer.add_scalar(f"eval/{key}", value, step or 0)
        print(f"TensorBoard scalars: {args.tensorboard_dir} (step {step or 0})")


def make_reference(args) -> None:
    extractor = InceptionFeatures(args.inception_weights, device=dist.resolve_device(args.device))
    if args.images.endswith(".npz"):
        batches = iter_npz_array(args.images, batch_size=args.eval_batch_size)
    else:
        batches = iter_folder_images(args.images, args.image_size, args.eval_batch_size)
    write_reference(
        batches, args.make_ref, extractor, keep_images=args.ref_images, progress=sys.stderr.isatty()
    )
    print(f"reference statistics: {args.make_ref}")


def check_inputs(args) -> tuple[SampleSetConfig | None, object]:
    """Everything the command will need, checked before any sampling or feature extraction;
    returns the sample set to draw (None without --ckpt) and the reference, read once here."""
    if args.eval_batch_size < 1:
        raise UsageError(f"--eval-batch-size must be positive, got {args.eval_batch_size}")
    if args.inception_weights and not os.path.isfile(args.inception_weights):
        raise UsageError(f"--inception-weights {args.inception_weights} does not exist")
    if args.make_ref:
        if not args.images:
            raise UsageError("--make-ref needs --images (an image folder or an .npz)")
        if not os.path.exists(args.images):
            raise UsageError(f"--images {args.images} does not exist")
        if not args.images.endswith(".npz") and args.image_size is None:
            raise UsageError("--make-ref from an image folder needs --image-size (e.g. 256)")
        if args.image_size is not None and args.image_size < 1:
            raise UsageError(f"--image-size must be positive, got {args.image_size}")
        if args.ref_images < 0:
            raise UsageError(f"--ref-images must be 0 or more, got {args.ref_images}")
        check_writable(args.make_ref, "--make-ref", is_dir=False)
        return None, None
    sample_set = None
    if args.samples:
        if not args.ref:
            raise UsageError("--samples needs --ref to evaluate against")
        try:
            npz_array_info(args.samples)  # a readable .npz with arr_0
        except NpzError as err:
            raise UsageError(
                f"--samples takes an .npz sample file (arr_0: uint8 N x H x W x 3 images): {err}"
            ) from None
    elif not args.ckpt:
        raise UsageError("give --ckpt to sample (and --ref to evaluate), or --samples")
    else:
        sample_set = SampleSetConfig.from_args(args)
        check_steps_and_guidance(args.num_sampling_steps, args.cfg_scale)
    reference = args.ref
    if args.ref and args.ref != "synthetic":
        reference = load_reference(args.ref)  # read and checked now, not after sampling
    if args.json:
        check_writable(args.json, "--json", is_dir=False)
    if args.tensorboard_dir:
        check_writable(args.tensorboard_dir, "--tensorboard-dir")
    return sample_set, reference


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sample_set, reference = check_inputs(args)
        if args.make_ref:
            make_reference(args)
            return 0
        if args.samples:
            score(args, reference, args.samples, {})
            return 0
        info = dist.setup(args.device)
        loaded = load_model(CheckpointRequest.from_args(args), info.device)
        apply_precision(loaded.precision)
        spec = sampler_from_args(loaded.family, args)
        samples_path, settings = draw_sample_set(loaded, spec, sample_set, info)
        if args.ref and info.is_main:
            score(args, reference, samples_path, settings, loaded.step)
        dist.cleanup()
    except InputError as err:
        return report(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
