"""Sampling benchmark: images/s of DiT's DDPM with classifier-free guidance and of SiT's SDE and
ODE samplers, DiT/SiT's sample.py recipe (`reference`) against ours (`fast`), side by side.

    python -m bench.sampling                          # CPU: S/2 models, 256 px, 25 steps
    python -m bench.sampling --device cuda --dit-model DiT-XL/2 --sit-model SiT-XL/2 --batch 32

reference: fp32 (TF32 on GPU), no compile; cond/uncond in one batch (as DiT's sample.py).
fast:      evaluate_fid.py's defaults on a GPU: autocast (bf16 where it is native) over the
           sampler and the VAE decode, the model's forward compiled (--no-compile to turn off).
Every image is drawn by engine.sampling.sample_batches, the loop of sample.py and the FID
sample sets, and the VAE decode is part of the timed work: images/s is images in [-1, 1] out
per second from noise in. Both modes start from the same noise and per-step noise (keyed to the
sample index), so the fast images are compared with the fp32 ones: max abs difference and PSNR
(range [-1, 1], peak-to-peak 2).

DiT zero-initialises its output and adaLN layers, so a fresh network predicts zeros and both
modes would agree trivially; the zero-initialised weights are drawn from N(0, 0.02) instead.
"""

import copy
import math
import sys

import torch

from common.cli import ArgumentParser
from engine.objective import ObjectiveConfig
from engine.precision import compile_blocks
from engine.sampling import index_labels, make_sampler, sample_batches, sampling_objective
from models import ATTENTIONS, MODEL_NAMES, create_model, parse_model_name

from .common import (
    add_compile_args,
    add_vae_args,
    build_codec,
    compile_setting,
    device_name,
    fast_precision,
    print_table,
    requested_device,
    time_side_by_side,
    write_json,
)


def random_model(name: str, attention: str, side: int, channels: int, seed: int):
    """A model whose zero-initialised weights are made non-zero, so its output is not zero."""
    torch.manual_seed(seed)
    model = create_model(name, attention=attention, input_size=side, in_channels=channels)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return model.eval()


def closeness(fast: torch.Tensor, reference: torch.Tensor) -> dict:
    fast, reference = fast.clamp(-1, 1).double(), reference.clamp(-1, 1).double()
    mse = (fast - reference).square().mean().item()
    return {
        "max_abs_diff": (fast - reference).abs().max().item(),
        "psnr_db": 10 * math.log10(4 / mse) if mse > 0 else math.inf,
    }


def table(payload: dict) -> tuple[list, list]:
    """Markdown header and cells of a result payload (also used by bench.report)."""
    header = ["sampler", "model", "attention", "mode", "precision", "compile", "batch"]
    header += ["s/batch", "img/s", "vs reference", "max abs diff", "PSNR dB"]
    cells = []
    for row in payload["rows"]:
        s, fast = row["settings"], row["mode"] == "fast"
        method = row["sampler"]
        if method == "ode":
            method += f" {row['spec']['sampling_method']}"
        cells.append(
            [
                f"{method}, {row['steps']} steps, cfg {row['cfg_scale']}",
                f"{row['model']} {row['image_size']}px",
                row["attention"],
                row["mode"],
                s["precision"] + (" (TF32)" if s["tf32"] and s["precision"] == "fp32" else ""),
                s["compile"] or "no",
                str(row["batch"]),
                f"{row['seconds']:.2f}",
                f"{row['images_per_s']:.3f}",
                f"{row['speedup_vs_reference']:.2f}x",
                f"{row['max_abs_diff']:.3g}" if fast else "-",
                f"{row['psnr_db']:.1f}" if fast else "-",
            ]
        )
    return header, cells


class Drawer:
    """Draws one batch with one mode's model and codec; the images of the last call are kept."""

    def __init__(self, model, codec, family, spec, precision, seed, latent_shape, labels):
        self.model, self.codec, self.family, self.spec = model, codec, family, spec
        self.precision, self.seed, self.latent_shape, self.labels = (
            precision,
            seed,
            latent_shape,
            labels,
        )
        self.images = None

    def __call__(self, spec=None):
        spec = spec or self.spec
        batches = sample_batches(
            self.model,
            sampling_objective(self.family, ObjectiveConfig(), spec),
            spec,
            self.codec,
            self.labels,
            self.latent_shape,
            seed=self.seed,
            batch_size=len(self.labels),
            precision=self.precision,
            uint8=False,
        )
        self.images = next(batches)[1]


def measure(args, method, kind, steps, settings, codec, device) -> list[dict]:
    """Both modes of one sampler and token mixer: warm-up (compiles), then alternated calls."""
    name = args.dit_model if method in ("ddpm", "ddim") else args.sit_model
    family = parse_model_name(name)[0]
    flags = {"cfg_scale": args.cfg_scale, "ode_method": args.ode_method}
    spec = make_sampler(family, method, steps, **flags)
    warm_spec = make_sampler(family, method, 2, **flags)
    side = args.image_size // codec.downsample
    channels = codec.latent_channels
    labels = index_labels(range(args.batch), args.seed, 1000)
    base = random_model(name, kind, side, channels, args.seed).to(device)
    drawers = {}
    for mode in settings:
        model = base if mode == "reference" else copy.deepcopy(base)
        if settings[mode]["compile"]:
            compile_blocks(model, settings[mode]["compile"])
        precision = settings[mode]["precision"]
        shape = (channels, side, side)
        drawers[mode] = Drawer(model, codec, family, spec, precision, args.seed, shape, labels)
    warmup = {
        mode: time_side_by_side({mode: lambda d=d: d(warm_spec)}, 1, device)[mode]
        for mode, d in drawers.items()
    }
    seconds = time_side_by_side(drawers, args.reps, device)
    close = closeness(drawers["fast"].images, drawers["reference"].images)
    return [
        {
            "sampler": method,
            "model": name,
            "attention": kind,
            "mode": mode,
            "spec": spec.describe(),
            "steps": steps,
            "cfg_scale": args.cfg_scale,
            "image_size": args.image_size,
            "batch": args.batch,
            "settings": settings[mode],
            "seconds": seconds[mode],
            "warmup_s": warmup[mode],
            "images_per_s": args.batch / seconds[mode],
            "speedup_vs_reference": seconds["reference"] / seconds[mode],
            **(close if mode == "fast" else {}),
        }
        for mode in settings
    ]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m bench.sampling",
        description="Images/s of the DDPM (DiT), SDE and ODE (SiT) samplers, VAE decode "
        "included: the reference sample.py recipe against ours (fast), side by side, and how "
        "far the fast images are from the fp32 ones.",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    parser.add_argument(
        "--dit-model",
        default="DiT-S/2",
        choices=MODEL_NAMES,
        metavar="NAME",
        help="model for ddpm/ddim (default DiT-S/2)",
    )
    parser.add_argument(
        "--sit-model",
        default="SiT-S/2",
        choices=MODEL_NAMES,
        metavar="NAME",
        help="model for sde/ode (default SiT-S/2)",
    )
    parser.add_argument(
        "--attention",
        nargs="+",
        default=["mhsa"],
        choices=ATTENTIONS,
        help="token mixers to measure (default: mhsa)",
    )
    parser.add_argument(
        "--samplers",
        nargs="+",
        default=["ddpm", "sde", "ode"],
        choices=["ddpm", "ddim", "sde", "ode"],
        help="samplers to measure (default: ddpm sde ode)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampling steps of every sampler (default: 250 on CUDA, as DiT/SiT; 25 on CPU)",
    )
    parser.add_argument(
        "--ode-method",
        default="euler",
        help="ODE method: a fixed-step one (euler, heun, midpoint, rk4) keeps the work equal "
        "across modes; dopri5 adapts its steps to the precision (default euler)",
    )
    parser.add_argument(
        "--cfg-scale", type=float, default=4.0, help="guidance scale (default 4.0, as sample.py)"
    )
    parser.add_argument(
        "--image-size", type=int, default=256, help="image side in pixels (default 256)"
    )
    parser.add_argument("--batch", type=int, default=2, help="images per call (default 2)")
    parser.add_argument(
        "--reps", type=int, default=1, help="timed calls per mode; the median is kept (1)"
    )
    parser.add_argument(
        "--fast-precision",
        choices=["bf16", "fp16", "fp32"],
        default=None,
        help="autocast precision of the fast mode (default: bf16 on CUDA and on CPUs with "
        "native bf16, else fp32)",
    )
    add_compile_args(parser)
    parser.add_argument("--seed", type=int, default=0, help="weights and noise seed (default 0)")
    parser.add_argument(
        "--out", default="bench/results/sampling.json", help="where to write the JSON"
    )
    add_vae_args(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)

    device = requested_device(parser, args.device)
    steps = args.steps or (250 if device.type == "cuda" else 25)
    precision = args.fast_precision or fast_precision(device)
    settings = {
        "reference": {"precision": "fp32", "tf32": device.type == "cuda", "compile": False},
        "fast": {
            "precision": precision,
            "tf32": device.type == "cuda",
            "compile": compile_setting(args),
        },
    }
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as DiT
    codec = build_codec(args, device, seed=args.seed)
    side = args.image_size // codec.downsample
    print(f"device: {device_name(device)}, torch {torch.__version__}")
    print(
        f"{args.image_size} px ({side}x{side} latents), batch {args.batch}, {steps} steps, "
        f"cfg {args.cfg_scale}, VAE decode included, median of {args.reps}"
    )
    rows = []
    for method in args.samplers:
        for kind in args.attention:
            rows += measure(args, method, kind, steps, settings, codec, device)
    payload = {
        "benchmark": "sampling",
        "argv": sys.argv[1:] if argv is None else argv,
        "torch": torch.__version__,
        "device": device_name(device),
        "vae": args.vae or f"random-{args.random_vae}",
        "vae_decode_included": True,
        "settings": settings,
        "rows": rows,
    }
    print_table(*table(payload))
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
