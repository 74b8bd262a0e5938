"""Helpers shared by the benchmarks: the VAE they run, the mixers they compare (and the stream
kernel a "vca@triton" mixer runs under), fair timing of several configurations side by side,
device facts, and the markdown/JSON output."""

import json
import os
import platform
import statistics
import time

import torch

from engine.dist import resolve_device
from engine.errors import UsageError
from models import ATTENTIONS, MODEL_NAMES
from models.attention import STREAM_KERNELS
from models.codec import VAECodec, load_codec
from models.config import VCA_FAMILY

# "vca@KERNEL": VCA whose stream products run in one stream kernel (using_stream_kernel), to
# time the kernels side by side with each other and with MHSA; plain "vca" takes the default.
MIXERS = (
    *ATTENTIONS,
    *(f"{kind}@{kernel}" for kind in VCA_FAMILY for kernel in STREAM_KERNELS if kernel != "auto"),
)


def split_mixer(spec: str) -> tuple[str, str]:
    """(attention, stream kernel) of a mixer: ("vca", "triton") for vca@triton, ("vca", "auto")
    for vca."""
    kind, _, kernel = spec.partition("@")
    return kind, kernel or "auto"


# Stable Diffusion's VAE (stabilityai/sd-vae-ft-ema config.json): random weights cost exactly what
# the real ones do, so the benchmarks need no download. "tiny" keeps the 8x downsampling for tests.
VAE_CONFIGS = {
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
    "tiny": dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4),
}


def add_vae_args(parser) -> None:
    parser.add_argument(
        "--vae",
        default=None,
        help="ema, mse or a saved AutoencoderKL folder, loaded by models.codec.load_codec "
        "(default: the SD VAE architecture with random weights; same compute, no download)",
    )
    parser.add_argument(
        "--random-vae",
        choices=list(VAE_CONFIGS),
        default="sd",
        help="architecture of the random VAE when --vae is not given: sd (default) or tiny "
        "(a 4-level toy for tests)",
    )


def add_setup_args(parser, attention_help: str, mixers=ATTENTIONS) -> None:
    """--device, --model, --attention, --image-size and --batch of the model benchmarks."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    parser.add_argument(
        "--model",
        default="DiT-S/2",
        choices=MODEL_NAMES,
        metavar="NAME",
        help="model, DiT-T/2 ... SiT-XL/8 (default DiT-S/2)",
    )
    parser.add_argument(
        "--attention", nargs="+", default=["mhsa", "vca"], choices=mixers, help=attention_help
    )
    parser.add_argument(
        "--image-size", type=int, default=256, help="image side in pixels (default 256)"
    )
    parser.add_argument("--batch", type=int, default=4, help="global batch size (default 4)")


def add_compile_args(parser) -> None:
    parser.add_argument("--no-compile", action="store_true", help="fast mode without torch.compile")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the fast mode (default inductor; eager or aot_eager "
        "trace the model without generating kernels, to check the path quickly)",
    )


def compile_setting(args):
    """The fast mode's compile backend, or False for none (as recorded in the JSON)."""
    return False if args.no_compile else args.compile_backend


def build_codec(args, device, seed: int = 0) -> VAECodec:
    """The fp32 VAE codec (fast modes run it under autocast); a random one is seeded."""
    if args.vae:
        return load_codec(args.vae, device)
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=256,
        scaling_factor=0.18215,
        **VAE_CONFIGS[args.random_vae],
    )
    return VAECodec(vae, f"random-{args.random_vae}", device)


def requested_device(parser, spec: str) -> torch.device:
    """The --device flag as a device; a bad one exits 2 in one line."""
    try:
        return resolve_device(spec)
    except UsageError as err:
        parser.exit(2, f"error: {err}\n")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(runs: dict, reps: int, device: torch.device) -> dict:
    """Median seconds of each callable in `runs`, the callables taking turns within every
    repetition so a noisy machine slows them alike. Warm-up is the caller's."""
    times = {key: [] for key in runs}
    for _ in range(reps):
        for key, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def cpu_bf16_is_native() -> bool:
    """oneDNN runs bf16 with native instructions (AVX512-BF16 or AMX) on this CPU; without them
    it emulates bf16 and autocast is slower than fp32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def fast_precision(device: torch.device) -> str:
    """The fast modes' autocast: bf16 on GPUs and on CPUs that run it natively (at the
    benchmarks' S/2 width it pays on such a CPU too; train.py's auto keeps CPUs in fp32, which
    suits the tiny models CPUs train), else fp32."""
    if device.type == "cuda" or cpu_bf16_is_native():
        return "bf16"
    return "fp32"


def print_table(header: list, rows: list) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |", flush=True)


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}")
