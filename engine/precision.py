"""Numeric precision and compilation: what `--precision` and `--compile` mean in every script,
and which settings are the fast defaults on a given device."""

import argparse
import contextlib

import torch

PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto': bf16 autocast on GPUs, fp32 on CPUs. Even with native bf16 a CPU gains from it
    only on wide models (DiT-S/2: 1.7x), and loses on the small ones CPUs train (DiT-T: 0.5x)."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" else "fp32"


def apply_precision(precision: str) -> None:
    """The process-wide part of a resolved precision: TF32 matmuls and convolutions on GPUs for
    every setting but fp32, so fp32 means fp32 (autocast itself is `autocast_context`)."""
    torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
    torch.backends.cudnn.allow_tf32 = precision != "fp32"


def autocast_context(precision: str, device: torch.device):
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def resolve_compile(flag: bool | None, device: torch.device) -> bool:
    """--compile / --no-compile, or by default on GPUs only: on a CPU, inductor's code generation
    takes minutes, more than a short CPU run gains from it."""
    return device.type == "cuda" if flag is None else flag


def add_precision_args(
    group, precision: str = "auto", compile_default: bool | None = None, compiles: bool = True
) -> None:
    """--precision and --compile/--no-compile (where the script `compiles` its DiT's blocks),
    with the same meaning in every script."""
    group.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=precision,
        help="auto (bf16 autocast on GPUs, fp32 on CPUs), fp32, "
        "tf32 matmuls, or bf16/fp16 autocast (fp16 with loss scaling in training); TF32 is on "
        f"for GPU matmuls unless fp32 (default {precision})",
    )
    if not compiles:
        return
    default = {None: "on for CUDA, off on CPU", True: "on", False: "off"}[compile_default]
    group.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=compile_default,
        help="torch.compile each transformer block in place (one graph all blocks share; the "
        "embedders and the final layer stay eager); a one-off cost of a minute or more "
        f"(default: {default})",
    )


def compile_blocks(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """Compile each transformer block of a DiT in place (regional compilation). The blocks are
    one module type with their depth in buffers, so they share one graph: compiling costs one
    block's time at any depth (DiT-S/2, 12 blocks: about a third of compiling the whole model).
    Training, guided sampling and DDP all call the compiled blocks; the embedders and the final
    layer, a few small ops, stay eager."""
    for block in model.blocks:
        block.compile(backend=backend)
    return model
