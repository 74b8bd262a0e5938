"""`python -m models --table`: parameters and GMACs of every model and attention, counted on the
built modules (meta device, so even XL at 512 px costs no memory)."""

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from common.cli import ArgumentParser

from . import ATTENTION_HELP, ATTENTIONS, MODEL_NAMES, create_model
from .attention import InlineCustomOps


def count(name: str, attention: str, image_size: int, num_classes: int = 1000) -> dict:
    """Parameters (fixed positional embedding included, as DiT reports) and forward GMACs."""
    latent = image_size // 8
    with torch.device("meta"):
        model = create_model(name, attention=attention, input_size=latent, num_classes=num_classes)
        x = torch.empty(1, 4, latent, latent)
        t = torch.zeros(1)
        y = torch.zeros(1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter, InlineCustomOps(), torch.no_grad():
        model(x, t, y)
    params = sum(p.numel() for p in model.parameters())
    return {
        "model": name,
        "attention": attention,
        "image_size": image_size,
        "params": params,
        "gmacs": counter.get_total_flops() / 2e9,
    }


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
        default=list(ATTENTIONS),
        choices=ATTENTIONS,
        metavar="ATTN",
        help=f"attentions to count (default: all of {', '.join(ATTENTIONS)})",
    )
    parser.add_argument(
        "--image-size",
        nargs="+",
        type=int,
        default=[256, 512],
        metavar="PX",
        help="image sides in pixels; latents are 1/8 of that (default: 256 512)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)

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
