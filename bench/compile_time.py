"""Compile time of the training forward and backward, MHSA against VCA: train.py's compiled
blocks (engine.precision.compile_blocks) under the fast precision, each attention in a fresh
process with an empty inductor cache, so that every kernel is generated and built again.

    python -m bench.compile_time                                   # DiT-S/2 at 256 px, CPU
    python -m bench.compile_time --device cuda --model DiT-XL/2 --batch 32

Compile time = the first step's time minus the median of the next steps'.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from common.cli import ArgumentParser
from engine.precision import autocast_context, compile_blocks
from models import create_model
from models.attention import using_stream_kernel

from .common import (
    MIXERS,
    add_setup_args,
    device_name,
    fast_precision,
    print_table,
    requested_device,
    split_mixer,
    write_json,
)


def one_attention(args) -> dict:
    """Runs in the fresh process: the first compiled step, then a few more."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    side = args.image_size // 8
    kind, kernel = split_mixer(args.attention[0])
    model = create_model(args.model, attention=kind, input_size=side).to(device)
    compile_blocks(model, args.backend)
    precision = fast_precision(device)
    x = torch.randn(args.batch, 4, side, side, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)

    def step() -> float:
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        with using_stream_kernel(kernel):
            with autocast_context(precision, device):
                out = model(x, t, y)
            out.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    first = step()
    later = statistics.median(step() for _ in range(3))
    return {"first_step_s": first, "step_s": later, "compile_s": first - later}


def main(argv=None):
    parser = ArgumentParser(
        prog="python -m bench.compile_time",
        description="Cold compile time of the training step's blocks, MHSA against VCA.",
    )
    add_setup_args(
        parser,
        "mixers to compile, each in its own process, the first the baseline (default: mhsa "
        "vca); vca@aten compiles VCA's stream products as one opaque op, vca@traced as the "
        "ops inductor fuses (plain vca: traced)",
        MIXERS,
    )
    parser.add_argument(
        "--backend",
        default="inductor",
        help="torch.compile backend (default inductor; eager checks the path in seconds)",
    )
    parser.add_argument(
        "--out", default="bench/results/compile_time.json", help="where to write the JSON"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(one_attention(args)))
        return
    device = requested_device(parser, args.device)
    rows = []
    for kind in args.attention:
        cmd = [sys.executable, "-m", "bench.compile_time", "--child", "--attention", kind]
        cmd += ["--device", args.device, "--model", args.model, "--backend", args.backend]
        cmd += ["--image-size", str(args.image_size), "--batch", str(args.batch)]
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"error: compiling with {kind} failed:\n{done.stderr[-3000:]}")
        rows.append({"attention": kind, **json.loads(done.stdout.strip().splitlines()[-1])})
    setting = f"{args.model} at {args.image_size} px, batch {args.batch}, {args.backend}"
    payload = {"argv": sys.argv[1:], "torch": torch.__version__, "device": device_name(device)}
    payload["rows"] = rows
    print(f"device: {payload['device']}, {setting}, torch {torch.__version__}")
    print_table(*table(payload))
    write_json(args.out, payload)


def table(payload: dict) -> tuple[list, list]:
    rows = payload["rows"]
    base = rows[0]
    header = ["attention", "first step s", "later step s", "compile s", f"vs {base['attention']}"]
    cells = [
        [
            r["attention"],
            f"{r['first_step_s']:.1f}",
            f"{r['step_s']:.2f}",
            f"{r['compile_s']:.1f}",
            f"{r['compile_s'] / base['compile_s']:.2f}x",
        ]
        for r in rows
    ]
    return header, cells


if __name__ == "__main__":
    main()
