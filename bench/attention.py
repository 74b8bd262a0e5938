"""Attention benchmark: forward and forward+backward time and peak memory of one attention layer
(qkv projection, token mixing, output projection), MHSA against VCA, at several token counts.

    python -m bench.attention                      # CPU: S and XL widths, N = 256, 1024, 4096
    python -m bench.attention --device cuda        # GPU rows, bf16
    python -m bench.attention --no-timing --batch 16   # peak memory alone, at a larger batch

    python -m bench.attention --compile --dtype bf16 --batch 4   # compiled, as train.py runs it

Timings alternate between the attentions inside one run, so the ratios are side by side.
Peak memory is what one call adds: torch's allocator peak on CUDA, the peak of the bytes held
by live tensors on CPU (counted op by op: deterministic, and blind to library workspaces; it
cannot see inside inductor's kernels, so compiled CPU rows have none). Saved memory is what
the forward keeps for the backward beyond its input and weights: what each layer adds to a
training step's activations, compiled or not.
"""

import argparse
import functools
import math
import sys
import weakref

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.common import (
    MIXERS,
    device_name,
    requested_device,
    split_mixer,
    time_side_by_side,
    write_json,
)
from common.cli import ArgumentParser
from models import WIDTHS
from models.attention import InlineCustomOps, build_attention, using_stream_kernel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class MixingOnly(torch.nn.Module):
    """The token mixing alone: takes the qkv projection's output, skips both projections (which
    are the same matrices in every mixer), so the ratio isolates what the mixers differ in."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        B, N, _ = qkv.shape
        heads = qkv.reshape(B, N, 3, self.layer.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return self.layer.mix(*heads)


def make_layer(spec, width, tokens, device, dtype, part="layer", compiled=False):
    """The module to time and the width of its input (C for a layer, 3C for the mixing); `spec`
    is a mixer, or a VCA mixer with its stream kernel ("vca@triton"). `compiled`: compiled in
    place by inductor, as train.py compiles its blocks."""
    kind = split_mixer(spec)[0]
    _, hidden, heads = WIDTHS[width]
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise ValueError(f"token count {tokens} is not a square grid")
    layer = build_attention(kind, hidden, heads, (side, side), layer_index=0)
    layer = layer.to(device=device, dtype=dtype)
    if part == "mixing":
        layer, hidden = MixingOnly(layer), 3 * hidden
    if compiled:
        layer.compile()
    return layer, hidden


def run_once(layer, x, backward, spec):
    with using_stream_kernel(split_mixer(spec)[1]):
        if backward:
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).float().square().mean().backward()
        else:
            with torch.no_grad():
                layer(x)


def time_layers(layers, x, backward, reps, device):
    """Median seconds per call of each layer after one warm-up call, taking turns."""
    for spec, layer in layers.items():
        run_once(layer, x, backward, spec)
    runs = {s: functools.partial(run_once, layer, x, backward, s) for s, layer in layers.items()}
    return time_side_by_side(runs, reps, device)


def operator_table(kind, args, device, dtype, rows: int = 15) -> str:
    """The operators that take the most self time over --reps forward+backward calls; with
    --compile, inductor's generated kernels by name."""
    if args.compile:
        torch._inductor.config.cpp.enable_kernel_profile = True
    layer, hidden = make_layer(
        kind, args.widths[0], args.tokens[0], device, dtype, args.part, args.compile
    )
    x = torch.randn(args.batch, args.tokens[0], hidden, device=device, dtype=dtype)
    x.requires_grad_(True)
    for _ in range(2):  # compiles, then warms
        run_once(layer, x, True, kind)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.reps):
            run_once(layer, x, True, kind)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=90)


def saved_memory_mb(layer, x, spec) -> float:
    """MB of the tensors the forward saves for the backward, other than the input and the
    weights (each storage counted once)."""
    known = {t.untyped_storage().data_ptr() for t in (x, *layer.parameters())}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in known:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with (
        using_stream_kernel(split_mixer(spec)[1]),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        layer(x)
    return sum(saved.values()) / 2**20


def peak_memory_mb(kind, width, tokens, batch, device, dtype_name, backward, part, compiled=False):
    """Peak memory (MB) that one call adds on top of the layer and its input: the allocator's
    peak on CUDA; on CPU, which keeps no allocator statistics, the peak of the bytes held by
    live tensors, counted op by op (the same quantity, free of library workspaces and of
    what glibc keeps). Compiled layers are measured on CUDA only, after a compiling call."""
    layer, hidden = make_layer(kind, width, tokens, device, DTYPES[dtype_name], part, compiled)
    x = torch.randn(batch, tokens, hidden, device=device, dtype=DTYPES[dtype_name])
    x.requires_grad_(backward)
    if device.type == "cuda":
        if compiled:
            run_once(layer, x, backward, kind)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once(layer, x, backward, kind)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with LiveTensorBytes() as counter, InlineCustomOps():
        run_once(layer, x, backward, kind)
    return counter.peak / 2**20


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages that ops create while it is active and that are
    still alive, and keeps the peak. Views and in-place results share an input's storage and
    add nothing, so the weights and the input, made before, are not counted (as on CUDA, where
    the allocator's peak is taken above what was allocated before the call)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {  # before the call: an out= tensor or an input it resizes gets new storage
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size and key not in self.storages and key not in inputs:
                self.storages.add(key)
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, key, size)
        return out

    def _freed(self, key, size):
        self.storages.discard(key)
        self.live -= size


def square_tokens(value: str) -> int:
    """--tokens: a token count that tiles a square grid, as the mixers' layout needs."""
    tokens = int(value)
    if tokens < 1 or math.isqrt(tokens) ** 2 != tokens:
        raise argparse.ArgumentTypeError(f"{value} is not a square grid's token count (e.g. 256)")
    return tokens


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m bench.attention",
        description="Time and memory of one attention layer, MHSA against VCA (and others).",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="fp32 or bf16 (default: fp32 on CPU, bf16 on CUDA)",
    )
    parser.add_argument(
        "--attention",
        nargs="+",
        default=["mhsa", "vca"],
        choices=MIXERS,
        metavar="MIXER",
        help="mixers to compare, the first the baseline (default: mhsa vca); vca@triton (any "
        "VCA variant@triton) runs VCA's stream products in the Triton kernels, on CUDA",
    )
    parser.add_argument(
        "--widths", nargs="+", default=["S", "XL"], choices=WIDTHS, help="model widths"
    )
    parser.add_argument(
        "--tokens",
        nargs="+",
        type=square_tokens,
        default=[256, 1024, 4096],
        help="token counts N, each a square grid's (default: 256 1024 4096)",
    )
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument(
        "--reps", type=int, default=5, help="timed repetitions per cell; the median is kept"
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the peak-memory measurements"
    )
    parser.add_argument(
        "--no-timing",
        action="store_true",
        help="skip the timings: peak memory only (quick at large batches)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile each layer with inductor, as train.py's --compile compiles its blocks "
        "(default: eager)",
    )
    parser.add_argument(
        "--part",
        choices=["layer", "mixing"],
        default="layer",
        help="layer: qkv projection + token mixing + output projection (default); mixing: the "
        "token mixing alone, from the qkv projection's output (the part the mixers differ in)",
    )
    parser.add_argument(
        "--out", default="bench/results/attention.json", help="where to write the JSON rows"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the table, torch.profiler's operator table of --reps forward+backward "
        "calls of each mixer at the first width and token count: where the time goes",
    )
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)

    device = requested_device(parser, args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    base = args.attention[0]
    if args.no_memory and args.no_timing:
        parser.error("--no-memory and --no-timing leave nothing to measure")
    peaks = not args.no_memory and not (args.compile and device.type == "cpu")
    if args.profile:
        for kind in args.attention:
            print(f"{kind}, {args.part}, {args.widths[0]} width, {args.tokens[0]} tokens, fwd+bwd:")
            print(operator_table(kind, args, device, DTYPES[dtype_name]))
        return

    rows = []
    header = ["width", "N", "pass"]
    if not args.no_timing:
        header += [f"{k} ms" for k in args.attention]
        header += [f"{k}/{base}" for k in args.attention[1:]]
    if peaks:
        header += [f"{k} MB" for k in args.attention]
        header += [f"{k}/{base} MB" for k in args.attention[1:]]
    if not args.no_memory:
        header += [f"{k} saved MB" for k in args.attention]
        header += [f"{k}/{base} saved" for k in args.attention[1:]]
    mode = "compiled" if args.compile else "eager"
    setting = f"{args.part}, {mode}, {dtype_name}, batch {args.batch}, torch {torch.__version__}"
    print(f"device: {device_name(device)}, {setting}")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for width in args.widths:
        for tokens in args.tokens:
            if args.compile:  # no graphs of another shape, which would make shapes dynamic
                torch._dynamo.reset()
            layers = {}
            for kind in args.attention:
                layers[kind], hidden = make_layer(
                    kind, width, tokens, device, DTYPES[dtype_name], args.part, args.compile
                )
            x = torch.randn(args.batch, tokens, hidden, device=device, dtype=DTYPES[dtype_name])
            for backward in (False, True):
                x.requires_grad_(backward)
                row = {
                    "width": width,
                    "tokens": tokens,
                    "pass": "fwd+bwd" if backward else "fwd",
                    "part": args.part,
                    "batch": args.batch,
                    "dtype": dtype_name,
                    "compiled": args.compile,
                    "device": device_name(device),
                }
                cells = [width, str(tokens), row["pass"]]
                if not args.no_timing:
                    seconds = time_layers(layers, x, backward, args.reps, device)
                    row["ms"] = {k: 1000 * s for k, s in seconds.items()}
                    row["speedup_vs_" + base] = {
                        k: seconds[base] / seconds[k] for k in args.attention[1:]
                    }
                    cells += [f"{row['ms'][k]:.2f}" for k in args.attention]
                    cells += [f"{v:.2f}x faster" for v in row["speedup_vs_" + base].values()]
                if peaks:
                    peak = {
                        k: peak_memory_mb(
                            k,
                            width,
                            tokens,
                            args.batch,
                            device,
                            dtype_name,
                            backward,
                            args.part,
                            args.compile,
                        )
                        for k in args.attention
                    }
                    row["peak_mb"] = peak
                    cells += [f"{peak[k]:.1f}" for k in args.attention]
                    cells += [f"{peak[k] / peak[base]:.2f}x" for k in args.attention[1:]]
                if backward and not args.no_memory:
                    saved = {k: saved_memory_mb(layers[k], x, k) for k in args.attention}
                    row["saved_mb"] = saved
                    cells += [f"{saved[k]:.1f}" for k in args.attention]
                    cells += [f"{saved[k] / saved[base]:.2f}x" for k in args.attention[1:]]
                elif not args.no_memory:
                    cells += ["-"] * (2 * len(args.attention) - 1)
                print("| " + " | ".join(cells) + " |", flush=True)
                rows.append(row)
            del layers, x
    payload = {"argv": sys.argv[1:], "torch": torch.__version__, "device": device_name(device)}
    write_json(args.out, {**payload, "rows": rows})


if __name__ == "__main__":
    main()
