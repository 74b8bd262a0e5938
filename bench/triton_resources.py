"""What the Triton stream kernels (models.triton_streams) need of a GPU, found without one: each
kernel compiled for a GPU architecture (Triton and its bundled ptxas need no device) with the
tiles it launches with at the largest operands `supports` lets through (without the launch's
divisibility hints), and its shared memory against that architecture's per-block limit: a
kernel over it does not launch. Where the Triton wheel ships cuobjdump, also its registers per
thread and stack frame (local memory: spills).

    python -m bench.triton_resources                        # bf16 on sm_80, 86, 89, 90, 100, 120
    python -m bench.triton_resources --dtypes bf16 fp32 --archs 90 --out resources.json
"""

import os
import re
import shutil
import subprocess
import tempfile

from common.cli import ArgumentParser

from .common import print_table, write_json

# The opt-in maximum of shared memory per thread block, by compute capability, in bytes (CUDA C++
# Programming Guide, technical specifications per compute capability).
SHARED_LIMIT = {
    80: 163 << 10,
    86: 99 << 10,
    89: 99 << 10,
    90: 227 << 10,
    100: 227 << 10,
    120: 99 << 10,
}
DTYPES = ("bf16", "fp16", "fp32", "fp64")
KERNELS = ("stage2_forward", "stage2_backward", "stage1_forward", "stage1_backward")


def launch(kernel: str, dtype: str):
    """The kernel function, the element type of each pointer argument and the constexprs it is
    launched with (models.triton_streams.launch_tiles), at MAX_STREAM_TOKENS and MAX_HEAD_DIM."""
    import triton.language as tl

    from models import triton_streams as ts

    wide = dtype == "fp64"
    acc, acc_pointer = (tl.float64, "*fp64") if wide else (tl.float32, "*fp32")
    pointers = {"lam_ptr": "*fp32", "stats_ptr": acc_pointer, "glam_ptr": acc_pointer}
    if kernel == "stage2_backward":  # per-program partial sums of the key and value gradients
        pointers.update(gk_ptr=acc_pointer, gv_ptr=acc_pointer)
    function = getattr(ts, f"_{kernel}")
    tiles = {"ACC": acc, **ts.launch_tiles(function, ts.MAX_STREAM_TOKENS, ts.MAX_HEAD_DIM)}
    if kernel.startswith("stage2"):
        tiles["JOINT"] = False
    elif kernel == "stage1_forward":
        tiles["STATS"] = True  # the backward's rerun, which also writes the statistics
    signature = {}
    for name in function.arg_names:  # operand pointers in the operands' dtype; ints: sizes, strides
        if name in tiles:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, f"*{dtype}")
        else:
            signature[name] = "i32"
    return function, signature, tiles


def resources(kernel: str, dtype: str, arch: int) -> dict:
    """Compiles one kernel for sm_<arch> and reads what it needs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from models import triton_streams as ts

    function, signature, tiles = launch(kernel, dtype)
    compiled = triton.compile(
        ASTSource(function, signature, constexprs=tiles),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": ts.NUM_WARPS},
    )
    row = {"kernel": kernel, "dtype": dtype, "arch": arch, "shared": compiled.metadata.shared}
    row["limit"] = SHARED_LIMIT[arch]
    row.update(registers_and_stack(compiled.asm["cubin"]))
    return row


def registers_and_stack(cubin: bytes) -> dict:
    """cuobjdump's resource usage of a cubin (None where the Triton wheel has no cuobjdump)."""
    import triton.backends.nvidia

    bundled = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    tool = bundled if os.path.exists(bundled) else shutil.which("cuobjdump")
    if tool is None:
        return {"registers": None, "stack": None}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
    found = {key: re.search(rf"{key}:(\d+)", usage.stdout) for key in ("REG", "STACK")}
    return {
        "registers": int(found["REG"].group(1)) if found["REG"] else None,
        "stack": int(found["STACK"].group(1)) if found["STACK"] else None,
    }


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m bench.triton_resources",
        description="Shared memory, registers and spills of the Triton stream kernels, "
        "compiled for GPU architectures without a GPU.",
    )
    parser.add_argument(
        "--archs",
        type=int,
        nargs="+",
        choices=sorted(SHARED_LIMIT),
        default=sorted(SHARED_LIMIT),
        help="compute capabilities x 10 to compile for (default: all of them)",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=DTYPES,
        default=["bf16"],
        help="operand dtypes (default bf16; compiled, the kernels take bf16 and fp16, and "
        "fp32/fp64 show why not: their compiles take minutes)",
    )
    parser.add_argument("--out", help="also write the rows to this JSON file")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Compile, not interpret: Triton reads this when the kernels are defined, on first import.
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        parser.error("needs Triton with its NVIDIA backend (torch's Linux wheels bundle it)")
    rows = [
        resources(kernel, dtype, arch)
        for dtype in args.dtypes
        for arch in args.archs
        for kernel in KERNELS
    ]
    print_table(
        ["dtype", "arch", "kernel", "shared KB", "limit KB", "fits", "registers", "stack B"],
        [
            [
                r["dtype"],
                f"sm_{r['arch']}",
                r["kernel"],
                f"{r['shared'] / 1024:.0f}",
                f"{r['limit'] / 1024:.0f}",
                "yes" if r["shared"] <= r["limit"] else "NO",
                str(r["registers"]),
                str(r["stack"]),
            ]
            for r in rows
        ],
    )
    if args.out:
        write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
