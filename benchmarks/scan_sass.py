"""Instructions a state and step in the Mamba-1 prefill scan's loops, compiled for a Hopper GPU without
one: Triton compiles each kernel for sm_90 on the host, its bundled `cuobjdump` disassembles the cubin, and
the loop bodies (the backward branches' spans) are counted by opcode. Per state and step = the loop's
instructions / (states a thread holds × steps a loop turn). Load to use: for each global load in the loop,
the instructions the warp issues before the first one that reads the loaded register (going round the loop):
what covers the load's latency (a DRAM access is several hundred cycles); the median over the loads (the
nearest is blurred where the compiler gives a register a new value within the turn). Registers a thread
bound the warps a multiprocessor holds (65,536 registers).

    python benchmarks/scan_sass.py [--n 16] [--chunk 128] [--block-d 4]

It also counts the training backward's loops, with the adjoint's reverse scan as Triton's reverse scan
and as a forward scan over reversed inputs (`ScanTiles.bwd_flip`).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

POINTERS = ("u", "delta", "A", "B", "C", "D", "z", "bias", "h0", "y", "h_last", "seg_h", "seg_dt")
BF16 = ("u", "delta", "z", "y")
# the training backward's: bf16 [B, D, L] tensors (time-contiguous rows padded to 16 elements, so that their
# batch and channel strides are multiples of 16 and their time stride 1, as the launch specialises them)
BWD_POINTERS = (
    "u", "delta", "A", "BC", "D", "z", "bias", "states", "dout",
    "du", "ddelta", "dz", "dA", "dBC", "dD", "dbias", "carry",
)  # fmt: skip
BWD_BF16 = ("u", "delta", "z", "dout", "du", "ddelta", "dz")
BWD_ROWS = ("u_", "dl_", "z_", "do_", "du_", "dd_", "dz_")
BWD_ONES = dict(a_n=1, bc_t=1, **{row + "t": 1 for row in BWD_ROWS})


def compile_sm90(fn, constants: dict, num_warps: int, pointers=POINTERS, bf16=BF16, aligned=()):
    """fn compiled for sm_90: `constants` as constexprs, `pointers` (bf16 where named in `bf16`) and the
    integers named in `aligned` known to be multiples of 16, as a launch would specialise them."""
    names = fn.arg_names
    signature = {}
    for name in names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*bf16" if name in bf16 else "*fp32"
        else:
            signature[name] = "i32"
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in names if k in pointers or k in aligned}
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constants.items()},
        attrs=attrs,
    )
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


def _bare(text: str) -> str:
    """An instruction without its predicate (`@P0 `, `@!UP1 `)."""
    return re.sub(r"^@!?U?P\w+\s+", "", text)


def _opcode(text: str) -> str:
    return _bare(text).split()[0]


def _cuobjdump(kernel, flag: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def registers(kernel) -> int:
    """Registers a thread: with the warps a program, what bounds the programs a multiprocessor holds."""
    return int(re.search(r"REG:(\d+)", _cuobjdump(kernel, "-res-usage")).group(1))


def loops(kernel) -> list[list[str]]:
    """The instructions of each loop body (a span closed by a branch backwards), in address order."""
    sass = _cuobjdump(kernel, "-sass")
    code = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            code.append((int(m.group(1), 16), m.group(2)))
    out = []
    for at, text in code:
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < at:
            start = int(m.group(1), 16)
            out.append([t for a, t in code if start <= a <= at])
    return out


def load_to_use(body: list[str]) -> list[int]:
    """For each global load of a loop body, the instructions issued before the first that reads a register
    it loads (cyclically: a load for the next turn is read in it)."""
    out = []
    for i, text in enumerate(body):
        m = re.match(r"LDG\S*\s+R(\d+)", _bare(text))
        if not m:
            continue
        first, width = int(m.group(1)), 4 if ".128" in text else 2 if ".64" in text else 1
        regs = [rf"\bR{first + j}\b" for j in range(width)]
        for distance in range(1, len(body) + 1):
            later = _bare(body[(i + distance) % len(body)]).split(None, 1)
            if len(later) < 2:
                continue
            # an instruction's first operand is its destination, except a store's
            store = later[0].startswith("ST")
            read = later[1] if store else later[1].split(",", 1)[-1]
            if any(re.search(r, read) for r in regs):
                out.append(distance)
                break
            written = "" if store else later[1].split(",", 1)[0]
            if any(re.search(r, written) for r in regs):  # overwritten unread: a value of another turn's
                break
    return out


def main() -> None:
    from mambavl.ops.triton import scan

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="d_state")
    parser.add_argument("--chunk", type=int, default=128, help="the training backward's chunk")
    parser.add_argument("--block-d", type=int, default=4, help="the training backward's channels a program")
    args = parser.parse_args()
    n = args.n
    flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, HAS_H0=True, PREFETCH=0, FAST=True)
    lanes = dict(flags, N=n, BLOCK_D=32, VEC=n % 4 == 0, WIDE=False, SPLIT=True, UNROLL=1, DEPTH=1)
    steps = dict(flags, BLOCK_D=16, BLOCK_N=n, SEGMENTS=8, DEPTH=1)
    cases = [
        # name, kernel, constants, warps, states a thread, steps a loop turn
        ("steps (16 channels, 2 warps)", scan._selective_scan_steps_kernel,
         dict(steps, SUMMARY=False), 2, 16 * n // 64, 8),
        ("steps summary", scan._selective_scan_steps_kernel,
         dict(steps, SUMMARY=True), 2, 16 * n // 64, 8),
        ("lanes (1 warp)", scan._selective_scan_lanes_kernel,
         dict(lanes, PAIR=False, SUMMARY=False), 1, n, 1),
        ("lanes summary", scan._selective_scan_lanes_kernel,
         dict(lanes, PAIR=False, SUMMARY=True), 1, n, 1),
        ("lanes pair", scan._selective_scan_lanes_kernel,
         dict(lanes, PAIR=True, SUMMARY=False), 1, 2 * n, 1),
        ("lanes, prefetch 16 steps", scan._selective_scan_lanes_kernel,
         dict(lanes, PAIR=False, SUMMARY=False, PREFETCH=16), 1, n, 1),
        ("lanes, 2 steps a turn", scan._selective_scan_lanes_kernel,
         dict(lanes, PAIR=False, SUMMARY=False, UNROLL=2), 1, n, 2),
        ("lanes, loads 2 steps ahead", scan._selective_scan_lanes_kernel,
         dict(lanes, PAIR=False, SUMMARY=False, DEPTH=2), 1, n, 1),
        ("lanes, 2 ahead, 2 steps a turn", scan._selective_scan_lanes_kernel,
         dict(lanes, PAIR=False, SUMMARY=False, DEPTH=2, UNROLL=2), 1, n, 2),
        ("steps, prefetch 32 steps", scan._selective_scan_steps_kernel,
         dict(steps, SUMMARY=False, PREFETCH=32), 2, 16 * n // 64, 8),
        ("steps, loads 2 blocks ahead", scan._selective_scan_steps_kernel,
         dict(steps, SUMMARY=False, DEPTH=2), 2, 16 * n // 64, 8),
    ]  # fmt: skip
    print(f"triton {triton.__version__}, sm_90, d_state {n}")
    for name, fn, constants, warps, states, steps in cases:
        kernel = compile_sm90(fn, constants, warps)
        body = max(loops(kernel), key=len)
        report(name, kernel, body, states * steps)
    # the training backward: its loop over the states inside a chunk (the innermost loop) and the chunk
    # loop around it, per chunk (the state loop's turns counted N times); a state and step = one element
    aligned = [row + s for row in BWD_ROWS for s in "bd"]
    print(f"training backward, a chunk of {args.chunk} steps × {args.block_d} channels a warp:")
    for flip in (False, True):
        constants = dict(
            BWD_ONES, HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, CHUNK=args.chunk,
            BLOCK_D=args.block_d, FLIP=flip, FAST=True,
        )  # fmt: skip
        kernel = compile_sm90(scan._selective_scan_bwd_kernel, constants, 1, BWD_POINTERS, BWD_BF16, aligned)
        inner, outer = sorted(loops(kernel), key=len)[:2]
        elements = args.block_d * args.chunk // 32
        name = "flip" if flip else "reverse scan"
        report(f"bwd {name}: state loop", kernel, inner, elements)
        per_chunk = len(outer) - len(inner) + n * len(inner)
        print(
            f"bwd {name}: a chunk {per_chunk} instructions, "
            f"{per_chunk / (n * elements):5.2f} a state and step"
        )


def report(name: str, kernel, body: list[str], elements: int) -> None:
    """One loop's instructions, per state and step (`elements` a turn of a thread), its shuffles and
    multi-function ops, load-to-use cover, local-memory loads (spills) and the kernel's registers."""
    ops = collections.Counter(_opcode(t).split(".")[0] for t in body)
    top = ", ".join(f"{op} {count}" for op, count in ops.most_common(6))
    reach = sorted(load_to_use(body)) or [0]
    print(
        f"{name:<32} loop {len(body):4d}  per state and step {len(body) / elements:5.2f}  "
        f"MUFU {ops['MUFU']:3d}  "
        f"SHFL {ops['SHFL']:3d}  LDL {ops['LDL']:2d}  load to use median {reach[len(reach) // 2]:3d}  "
        f"registers {registers(kernel):3d}  ({top})"
    )


if __name__ == "__main__":
    main()
