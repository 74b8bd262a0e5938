"""`python -m models --table`: parameters and GMACs of every model and attention, counted on the
built modules (meta device, so even XL at 512 px costs no memory). `--classification`: the same
for the seed paper's timm classifiers at 224 px, beside the paper's parameter counts."""

import json
import os

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import atomic_write, check_writable
from common.cli import ArgumentParser

from . import ATTENTION_HELP, ATTENTIONS, MODEL_NAMES, create_model, parse_model_name
from .attention import InlineCustomOps
from .classifier import BACKBONES, create_classifier
from .codec import SD_VAE_DOWNSAMPLE

# The seed paper's Params column (M): backbone -> (its baseline, with VCA). PVT-Tiny is PVT v1,
# whose nearest timm model is PVT-v2-b1.
PAPER_PARAMS = {
    "deit_tiny_patch16_224": (5.7, 6.0),
    "deit_small_patch16_224": (22.1, 22.6),
    "pvt_v2_b1": (13.2, 11.6),
    "swin_tiny_patch4_window7_224": (28.9, 28.5),
}


def count(name: str, attention: str, image_size: int, num_classes: int = 1000) -> dict:
    """Parameters (fixed positional embedding included, as DiT reports) and forward GMACs."""
    latent = image_size // SD_VAE_DOWNSAMPLE
    with torch.device("meta"):
        model = create_model(name, attention=attention, input_size=latent, num_classes=num_classes)
        x = torch.empty(1, 4, latent, latent)
        t = torch.zeros(1)
        y = torch.zeros(1, dtype=torch.long)
    return {
        "model": name,
        "attention": attention,
        "image_size": image_size,
        "params": sum(p.numel() for p in model.parameters()),
        "gmacs": forward_gmacs(model, x, t, y),
    }


def forward_gmacs(model, *inputs) -> float:
    counter = FlopCounterMode(display=False)
    with counter, InlineCustomOps(), torch.no_grad():
        model(*inputs)
    return counter.get_total_flops() / 2e9


def count_classifier(name: str, attention: str, contrast_grid: int = 7) -> dict:
    """Parameters and forward GMACs of a timm classifier at 224 px with `attention`."""
    with torch.device("meta"):
        model = create_classifier(name, attention, contrast_grid=contrast_grid)
        image = torch.empty(1, 3, 224, 224)
    return {
        "model": name,
        "attention": attention,
        "params": sum(p.numel() for p in model.parameters()),
        "gmacs": forward_gmacs(model, image),
    }


def classification_table(attentions) -> list[dict]:
    """Print the classifier table (params M / GMACs per attention, and the paper's params)."""
    print("\n224 px, 1000 classes: params (M) / forward GMACs, batch 1; VCA with a 7 x 7 grid")
    columns = ["native", *attentions]
    print(f"| {'backbone':<28} | " + " | ".join(f"{a:>15}" for a in columns) + " | paper |")
    print("|" + "-" * 30 + "|" + "|".join("-" * 17 for _ in columns) + "|---|")
    rows = []
    for name in BACKBONES:
        cells = []
        for attention in columns:
            row = count_classifier(name, attention)
            rows.append(row)
            cells.append(f"{row['params'] / 1e6:6.2f} / {row['gmacs']:6.3f}")
        paper = "{} -> {}".format(*PAPER_PARAMS[name])
        print(f"| {name:<28} | " + " | ".join(cells) + f" | {paper} |")
    return rows


def generation_table(models, attentions, image_sizes) -> list[dict]:
    """Print the DiT/SiT table (params M / GMACs per attention) of each image size, row by row."""
    rows = []
    for size in image_sizes:
        print(f"\n{size} px: params (M) / forward GMACs, batch 1")
        print(f"| {'model':<10} | " + " | ".join(f"{a:>17}" for a in attentions) + " |")
        print("|" + "-" * 12 + "|" + "|".join("-" * 19 for _ in attentions) + "|")
        for name in models:
            cells = []
            for attention in attentions:
                row = count(name, attention, size)
                rows.append(row)
                cells.append(f"{row['params'] / 1e6:8.2f} / {row['gmacs']:6.2f}")
            print(f"| {name:<10} | " + " | ".join(cells) + " |", flush=True)
    return rows


def check_inputs(args) -> None:
    """The flags' values, checked before anything is counted or printed: a ValueError naming
    the flag."""
    for name in args.models:
        try:
            patch = parse_model_name(name)[2]
        except ValueError as err:
            raise ValueError(f"--models: {err}") from None
        for size in args.image_size:
            factor = SD_VAE_DOWNSAMPLE * patch
            if size <= 0 or size % factor:
                raise ValueError(
                    f"--image-size {size} makes no whole {patch} x {patch} patches of {name}'s "
                    f"latents (1/{SD_VAE_DOWNSAMPLE} of the image side): use a multiple of "
                    f"{factor}"
                )
    if args.json:
        check_writable(args.json, "--json", is_dir=False)  # an InputError, a ValueError too
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            raise ValueError(f"--json {args.json}: the folder {folder} does not exist")


def main(argv=None):
    parser = ArgumentParser(
        prog="python -m models",
        description="List the model registry, or print parameters and GMACs per config.",
        epilog="attentions: " + "; ".join(f"{k}: {v}" for k, v in ATTENTION_HELP.items()),
    )
    parser.add_argument("--table", action="store_true", help="print the params/GMACs table")
    parser.add_argument(
        "--models",
        nargs="+",
        default=[n for n in MODEL_NAMES if n.startswith("DiT") and "-T/" not in n],
        metavar="NAME",
        help="models to count (default: DiT-S/2 ... DiT-XL/8; SiT shares the backbone)",
    )
    parser.add_argument(
        "--attention",
        nargs="+",
        default=None,
        choices=ATTENTIONS,
        metavar="ATTN",
        help=f"attentions to count (default: all of {', '.join(ATTENTIONS)}; with "
        "--classification mhsa vca)",
    )
    parser.add_argument(
        "--image-size",
        nargs="+",
        type=int,
        default=[256, 512],
        metavar="PX",
        help="image sides in pixels; latents are 1/8 of that (default: 256 512)",
    )
    parser.add_argument(
        "--classification",
        action="store_true",
        help="with --table: the seed paper's timm classifiers (DeiT-T/S, PVT-v2-b1, Swin-T) at "
        "224 px, timm's own attention against --attention (default here: mhsa vca)",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="with --table: also write the rows as JSON to PATH, in a folder that exists "
        "(default: none)",
    )
    args = parser.parse_args(argv)
    args.attention = args.attention or (
        ["mhsa", "vca"] if args.classification else list(ATTENTIONS)
    )
    try:
        check_inputs(args)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    if args.classification:
        rows = classification_table(args.attention)
    elif args.table:
        rows = generation_table(args.models, args.attention, args.image_size)
    else:
        rows = None
        print("\n".join(MODEL_NAMES))
    if args.json and rows is not None:
        with atomic_write(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
