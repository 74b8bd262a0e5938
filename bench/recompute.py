"""What the compiled backward of VCA's traced stream differences keeps and what it recomputes:
one compiled attention layer, forward and backward, per policy, against MHSA, timed side by
side, with the bytes the forward saves for the backward.

    python -m bench.recompute                        # S and XL widths, 256 tokens, bf16, batch 4

Policies for `models.attention.traced_stream_difference`:
- recompute-maps (the project's): an activation checkpoint around the products; the backward
  recomputes query @ key^T and the softmaxes from query, key and value;
- save-maps: no checkpoint; the partitioner keeps what it likes, the softmax maps included;
- save-scores: a selective checkpoint that keeps the GEMMs' outputs (the scores) and
  recomputes the softmaxes and the map difference;
- budget-0.5: no checkpoint, and the partitioner's activation_memory_budget at 0.5 while the
  layer compiles (the knob applies to a whole graph, so here to the whole layer).
"""

import contextlib
import functools
import sys

import torch
import torch._functorch.config as functorch_config
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from bench.attention import make_layer, run_once, saved_memory_mb
from bench.common import device_name, print_table, time_side_by_side, write_json
from common.cli import ArgumentParser
from models import WIDTHS, attention

GEMMS = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default)


def keep_gemm_outputs(ctx, func, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if func in GEMMS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed(policy, *args):
    context = functools.partial(create_selective_checkpoint_contexts, policy)
    return checkpoint(
        attention.stream_difference_formula, *args, use_reentrant=False, context_fn=context
    )


def under_budget(*args):
    """The formula as its own function: torch.compile keeps one graph per function it traces,
    so this one is partitioned under the budget, not handed save-maps' graph."""
    return attention.stream_difference_formula(*args)


POLICIES = {
    "recompute-maps": attention.traced_stream_difference,
    "save-maps": attention.stream_difference_formula,
    "save-scores": functools.partial(checkpointed, keep_gemm_outputs),
    "budget-0.5": under_budget,
}
BUDGETS = {"budget-0.5": 0.5}


@contextlib.contextmanager
def policy_in_place(name: str):
    """The traced path runs `name`'s function while the layer traces and runs."""
    saved = attention.traced_stream_difference
    attention.traced_stream_difference = POLICIES.get(name, saved)
    try:
        with functorch_config.patch(activation_memory_budget=BUDGETS.get(name, 1.0)):
            yield
    finally:
        attention.traced_stream_difference = saved


def main(argv=None):
    parser = ArgumentParser(
        prog="python -m bench.recompute",
        description="Compiled VCA layer: what its traced stream differences save for the "
        "backward, per recompute policy, against MHSA.",
    )
    parser.add_argument("--widths", nargs="+", default=["S", "XL"], choices=WIDTHS)
    parser.add_argument("--tokens", type=int, default=256, help="token count N (default 256)")
    parser.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    parser.add_argument("--reps", type=int, default=11, help="timed calls per policy (default 11)")
    parser.add_argument(
        "--backend", default="inductor", help="torch.compile backend (default inductor)"
    )
    parser.add_argument("--out", default="bench/results/recompute.json", help="the JSON rows")
    args = parser.parse_args(argv)
    device, dtype = torch.device("cpu"), torch.bfloat16
    names = ["mhsa", *POLICIES]
    rows = []
    for width in args.widths:
        torch._dynamo.reset()  # no graphs of another width, which would make shapes dynamic
        layers, runs, saved = {}, {}, {}
        for name in names:
            spec = "mhsa" if name == "mhsa" else "vca@traced"
            layer, hidden = make_layer(spec, width, args.tokens, device, dtype)
            layer.compile(backend=args.backend)
            x = torch.randn(args.batch, args.tokens, hidden, dtype=dtype, requires_grad=True)

            def run(layer=layer, x=x, spec=spec, name=name):
                with policy_in_place(name):
                    run_once(layer, x, True, spec)

            run()  # compiles
            with policy_in_place(name):
                saved[name] = saved_memory_mb(layer, x, spec)
            layers[name], runs[name] = layer, run
        seconds = time_side_by_side(runs, args.reps, device)
        for name in names:
            rows.append(
                {
                    "width": width,
                    "tokens": args.tokens,
                    "batch": args.batch,
                    "policy": name,
                    "ms": 1000 * seconds[name],
                    "speed_vs_mhsa": seconds["mhsa"] / seconds[name],
                    "saved_mb": saved[name],
                    "saved_vs_mhsa": saved[name] / saved["mhsa"],
                }
            )
    payload = {"argv": sys.argv[1:] if argv is None else argv, "torch": torch.__version__}
    payload = {**payload, "device": device_name(device), "backend": args.backend, "rows": rows}
    print(
        f"device: {payload['device']}, bf16, compiled ({args.backend}), torch {torch.__version__}"
    )
    print_table(*table(payload))
    write_json(args.out, payload)


def table(payload: dict) -> tuple[list, list]:
    header = ["width", "N", "batch", "policy", "ms", "vs mhsa", "saved MB", "saved vs mhsa"]
    cells = [
        [r["width"], str(r["tokens"]), str(r["batch"]), r["policy"], f"{r['ms']:.2f}",
         f"{r['speed_vs_mhsa']:.2f}x", f"{r['saved_mb']:.1f}", f"{r['saved_vs_mhsa']:.2f}x"]
        for r in payload["rows"]
    ]  # fmt: skip
    return header, cells


if __name__ == "__main__":
    main()
