"""`python -m models --table`: parameters and GMACs of every model and attention, counted on the
built modules (meta device, so even XL at 512 px costs no memory). `--classification`: the same
for the seed paper's timm classifiers at 224 px, beside the paper's parameter counts."""

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from common.cli import ArgumentParser

from . import ATTENTION_HELP, ATTENTIONS, MODEL_NAMES, create_model
from .attention import InlineCustomOps
from .classifier import BACKBONES, create_classifier

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
    latent = image_size // 8
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
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.classification:
        rows = classification_table(args.attention or ["mhsa", "vca"])
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return

    args.attention = args.attention or list(ATTENTIONS)
    if not args.table:
        for name in MODEL_NAMES:
            print(name)
        return

    rows = []
    for size in args.image_size:
        print(f"\n{size} px: params (M) / forward GMACs, batch 1")
        print(f"| {'model':<10} | " + " | ".join(f"{a:>17}" for a in args.attention) + " |")
        print("|" + "-" * 12 + "|" + "|".join("-" * 19 for _ in args.attention) + "|")
        for name in args.models:
            cells = []
            for attention in args.attention:
                try:
                    row = count(name, attention, size)
                except ValueError as err:
                    parser.exit(2, f"error: {err}\n")
                rows.append(row)
                cells.append(f"{row['params'] / 1e6:8.2f} / {row['gmacs']:6.2f}")
            print(f"| {name:<10} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
