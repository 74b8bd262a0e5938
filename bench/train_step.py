"""Training-step benchmark: images/s, peak memory and model FLOPs utilisation of one training step,
the original DiT recipe (`reference`) against ours (`fast`), side by side in one run.

    python -m bench.train_step                                  # CPU: DiT-S/2, 256 px, batch 4
    python -m bench.train_step --device cuda --model DiT-XL/2 --batch 64

Both modes run train.py's own step (engine.step: batch_latents, then TrainStep) and differ only in
its settings:
reference: DiT's train.py: fp32 (TF32 on GPU), the VAE encodes the 256-px images every step,
           AdamW unfused (foreach=False, fused=False), no compile, no gradient norm.
fast:      train.py's defaults on a GPU: bf16 autocast (also on CPUs with native bf16, where it
           pays at S/2 width though train.py's auto stays fp32), latents drawn from a stored
           posterior mean/std as the latent cache does (no VAE in the step), fused AdamW,
           torch.compile (--no-compile to turn off), SDPA, the gradient norm it logs.
Both update the EMA every step, as DiT does. Data loading is left out (images and cached
posteriors sit on the device), so the numbers are the step's own.

Peak memory is the step's transient peak (CUDA allocator; on CPU the growth of the process's
peak resident set, a lower bound: memory the allocator kept from earlier steps is reused) plus
what the mode keeps resident: weights, gradients, EMA, optimizer state, VAE and batch. MFU counts
the model's FLOPs (torch.utils.flop_counter, one forward+backward; the VAE is not counted) over
the step time and the device's dense bf16 peak.
"""

import copy
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from common.cli import ArgumentParser
from engine.ema import create_ema
from engine.objective import ObjectiveConfig, create_objective
from engine.precision import compile_blocks
from engine.step import TrainStep, batch_latents, create_optimizer
from models import create_model, parse_model_name
from models.attention import InlineCustomOps, using_stream_kernel

from .common import (
    MIXERS,
    add_compile_args,
    add_setup_args,
    add_vae_args,
    build_codec,
    compile_setting,
    device_name,
    fast_precision,
    print_table,
    requested_device,
    split_mixer,
    synchronize,
    time_side_by_side,
    write_json,
)

# Dense bf16 peak TFLOP/s by device-name fragment; the first match wins (specific names first).
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
}
MODES = ("reference", "fast")


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


class Setup:
    """One mode's model, EMA, optimizer and batch, and train.py's step that trains on them."""

    def __init__(self, args, base_model, codec, settings, device, kernel="auto"):
        self.device, self.codec, self.kernel = device, codec, kernel
        self.model = copy.deepcopy(base_model).to(device).train()
        self.ema = create_ema(self.model)
        self.opt = create_optimizer(self.model, lr=1e-4, fused=settings["fused_adamw"])
        if settings["compile"]:
            compile_blocks(self.model, settings["compile"])
        family = parse_model_name(args.model)[0]
        self.train_step = TrainStep(
            self.model,
            self.model,
            create_objective(family, ObjectiveConfig()),
            self.opt,
            self.ema,
            precision=settings["precision"],
            ema_decay=0.9999,
            grad_clip=0.0 if settings["grad_norm"] else None,
        )
        b, side = args.batch, args.image_size // codec.downsample
        labels = torch.randint(1000, (b,), device=device)
        if settings["latents"] == "vae":  # a loader batch of images
            images = torch.rand(b, 3, args.image_size, args.image_size, device=device) * 2 - 1
            self.batch = (images, labels)
        else:  # a latent-cache batch: the posterior of each image and of its mirror image
            mean = torch.randn(b, 2, codec.latent_channels, side, side, device=device)
            std = 0.1 * torch.rand(b, 2, codec.latent_channels, side, side, device=device)
            self.batch = (mean, std, labels)

    def step(self) -> None:
        with using_stream_kernel(self.kernel):
            self.train_step(*batch_latents(self.batch, self.codec, self.device))

    def resident_bytes(self) -> int:
        tensors = [*self.model.parameters(), *self.ema.parameters(), *self.batch]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        for state in self.opt.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
        if len(self.batch) == 2 and hasattr(self.codec, "vae"):
            tensors += list(self.codec.vae.parameters())
        unique = {(t.data_ptr(), t.numel()): t for t in tensors}
        return sum(t.numel() * t.element_size() for t in unique.values())

    def peak_mb(self) -> float:
        """Transient peak of one (untimed) step plus the resident state, in MB."""
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            self.step()
            synchronize(self.device)
            transient = torch.cuda.max_memory_allocated(self.device) - before
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak resident set (VmHWM) to the current one
            before = _status_kb("VmHWM")
            self.step()
            transient = (_status_kb("VmHWM") - before) * 1024
        return (transient + self.resident_bytes()) / 2**20


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def step_flops(base_model, args, latent_channels, latent_side, device) -> int:
    """Model FLOPs of one forward+backward on the global batch (counted at batch 1, times B).
    Counted with SDPA's math backend: the counter knows no formula for CPU flash attention."""
    model = copy.deepcopy(base_model).to(device).train()
    objective = create_objective(parse_model_name(args.model)[0], ObjectiveConfig())
    x = torch.randn(1, latent_channels, latent_side, latent_side, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, InlineCustomOps():
        objective.training_losses(model, x, model_kwargs={"y": y})["loss"].mean().backward()
    return counter.get_total_flops() * args.batch


def table(payload: dict) -> tuple[list, list]:
    """Markdown header and cells of a result payload (also used by bench.report)."""
    rows = payload["rows"]
    first = rows[0]["attention"]
    header = ["model", "attention", "mode", "precision", "latents", "compile", "AdamW"]
    header += ["batch", "ms/step", "img/s", "peak MB", "model TFLOP/s", "MFU", "vs reference"]
    header += [f"vs {first}"]
    cells = []
    for row in rows:
        s = row["settings"]
        cells.append(
            [
                f"{row['model']} {row['image_size']}px",
                row["attention"],
                row["mode"],
                s["precision"] + (" (TF32)" if s["tf32"] and s["precision"] == "fp32" else ""),
                s["latents"],
                s["compile"] or "no",
                "fused" if s["fused_adamw"] else "unfused",
                str(row["batch"]),
                f"{1000 * row['step_s']:.0f}",
                f"{row['images_per_s']:.2f}",
                "-" if row["peak_mb"] is None else f"{row['peak_mb']:.0f}",
                f"{row['tflops_per_s']:.3g}",
                "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%",
                f"{row['speedup_vs_reference']:.2f}x",
                f"{row['speed_vs_first_attention']:.2f}x",
            ]
        )
    return header, cells


def mode_settings(args, device) -> dict:
    return {
        "reference": {
            "precision": "fp32",
            "tf32": device.type == "cuda",
            "latents": "vae",
            "fused_adamw": False,
            "compile": False,
            "grad_norm": False,
        },
        "fast": {
            "precision": args.fast_precision or fast_precision(device),
            "tf32": device.type == "cuda",
            "latents": "cached",
            "fused_adamw": True,
            "compile": compile_setting(args),
            "grad_norm": True,
        },
    }


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m bench.train_step",
        description="Images/s, peak memory and MFU of one training step: the original DiT "
        "recipe (reference) against ours (fast), side by side.",
    )
    add_setup_args(
        parser,
        "token mixers to measure, each in both modes (default: mhsa vca); vca@triton (any VCA "
        "variant@triton) runs VCA's stream products in the Triton kernels, on CUDA",
        MIXERS,
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed steps per setup first, at least 1 (the first compiles; its time is "
        "recorded as first_step_s; default 1)",
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps per setup; the median is kept (3)"
    )
    parser.add_argument(
        "--fast-precision",
        choices=["bf16", "fp32"],
        default=None,
        help="autocast precision of the fast mode (default: bf16 on CUDA and on CPUs with "
        "native bf16, else fp32)",
    )
    add_compile_args(parser)
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's dense bf16 peak for MFU (default: looked up by GPU name; none on CPU)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    parser.add_argument("--seed", type=int, default=0, help="weights and data seed (default 0)")
    parser.add_argument(
        "--out", default="bench/results/train_step.json", help="where to write the JSON"
    )
    add_vae_args(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)

    device = requested_device(parser, args.device)
    settings = mode_settings(args, device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # DiT's too
    codec = build_codec(args, device, seed=args.seed)
    side = args.image_size // codec.downsample
    peak = peak_tflops(device, args.peak_tflops)

    setups, flops = {}, {}
    for spec in args.attention:
        kind, kernel = split_mixer(spec)
        torch.manual_seed(args.seed)
        base = create_model(
            args.model, attention=kind, input_size=side, in_channels=codec.latent_channels
        )
        flops[spec] = step_flops(base, args, codec.latent_channels, side, device)
        for mode in MODES:
            torch.manual_seed(args.seed)
            setups[spec, mode] = Setup(args, base, codec, settings[mode], device, kernel)
    first_step = {}
    for key, setup in setups.items():
        first_step[key] = time_side_by_side({key: setup.step}, 1, device)[key]
        for _ in range(args.warmup - 1):
            setup.step()
    seconds = time_side_by_side({k: s.step for k, s in setups.items()}, args.steps, device)

    print(f"device: {device_name(device)}, torch {torch.__version__}")
    print(
        f"{args.model} at {args.image_size} px ({side}x{side} latents), global batch "
        f"{args.batch}, median of {args.steps} steps after {args.warmup} warm-up"
    )
    rows = []
    for (kind, mode), setup in setups.items():
        step_s = seconds[kind, mode]
        rows.append(
            {
                "model": args.model,
                "attention": kind,
                "mode": mode,
                "image_size": args.image_size,
                "batch": args.batch,
                "settings": settings[mode],
                "step_s": step_s,
                "first_step_s": first_step[kind, mode],
                "images_per_s": args.batch / step_s,
                "flops_per_step": flops[kind],
                "tflops_per_s": flops[kind] / step_s / 1e12,
                "mfu": flops[kind] / step_s / (peak * 1e12) if peak else None,
                "peak_mb": None if args.no_memory else setup.peak_mb(),
                "speedup_vs_reference": seconds[kind, "reference"] / step_s,
                "speed_vs_first_attention": seconds[args.attention[0], mode] / step_s,
            }
        )
    payload = {
        "benchmark": "train_step",
        "argv": sys.argv[1:] if argv is None else argv,
        "torch": torch.__version__,
        "device": device_name(device),
        "peak_tflops": peak,
        "vae": args.vae or f"random-{args.random_vae}",
        "settings": settings,
        "rows": rows,
    }
    print_table(*table(payload))
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
