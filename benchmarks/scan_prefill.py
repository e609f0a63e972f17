"""The Mamba-1 prefill scan's kernels side by side (needs a GPU): the step-by-step kernel (`steps`, the
kernel's default before) against the one-thread-a-channel kernel (`lanes`) at several warp counts and
segment counts, on the inputs laid out as the mixer hands them over (bf16 u, Δ and z channel-contiguous
views, B and C slices of x_proj's output, an initial state, the last state returned), at a preset's sizes
(cobra+3b by default) and several (batch, length) shapes: one long sequence (a 16k prefill), a server's
prefill batch, one image and prompt (time to first token). Each candidate's y and last state are compared
with the `steps` kernel's, and its time is the median of CUDA-event timings.

    python benchmarks/scan_prefill.py [--preset cobra+3b] [--shapes 1x16384,16x768,1x1529] [--out FILE]
        [--kernels steps,lanes,...]
"""

from __future__ import annotations

import json

import torch
from scan_common import chosen, parse

from mambavl.bench.timing import event_seconds


def candidates() -> list[tuple[str, dict]]:
    """The step-by-step kernel with its loads one block ahead (the default before the sixteenth pass), then
    the lanes kernel: one and two warps a program, two channels a thread, fixed segment counts beside the
    automatic choice, prefetch into L2, loads two steps ahead and two steps a loop turn; the step-by-step
    kernel with prefetch, loads two blocks ahead (the default since), fixed segments and other channel
    blocks."""
    steps = dict(prefill="steps", steps_depth=1)  # the step-by-step kernel as it was the default before
    out = [("steps", steps)]
    shapes = (("lanes", {}), ("lanes w2", dict(lanes_warps=2)), ("lanes pair", dict(lanes_pair=True)))
    for name, tiles in shapes:
        out.append((name, dict(prefill="lanes", **tiles)))
    for segments in (4, 8, 16):
        out.append((f"lanes s{segments}", dict(prefill="lanes", lanes_segments=segments)))
    out.append(("lanes pair s8", dict(prefill="lanes", lanes_pair=True, lanes_segments=8)))
    # prefetching a sequence's later steps into L2 (steps ahead), and the step-by-step kernel's segments
    for ahead in (8, 16, 32, 64):
        out.append((f"lanes p{ahead}", dict(prefill="lanes", lanes_prefetch=ahead)))
        out.append((f"steps p{ahead}", dict(steps, steps_prefetch=ahead)))
    for ahead in (0, 32):  # two steps a turn of the lanes kernel's loop
        out.append((f"lanes u2 p{ahead}", dict(prefill="lanes", lanes_unroll=2, lanes_prefetch=ahead)))
    # the lanes kernel's loads two steps ahead of their use, alone, two steps a turn, with prefetch
    for name, extra in (
        ("d2", {}), ("d2 u2", dict(lanes_unroll=2)), ("d2 p16", dict(lanes_prefetch=16)),
        ("d2 u2 p16", dict(lanes_unroll=2, lanes_prefetch=16)),
        ("d2 u2 s8", dict(lanes_unroll=2, lanes_segments=8)),
        ("d2 u2 s16", dict(lanes_unroll=2, lanes_segments=16)),
    ):  # fmt: skip
        out.append((f"lanes {name}", dict(prefill="lanes", lanes_depth=2, **extra)))
    # the step-by-step kernel's loads two blocks of eight steps ahead, alone and with prefetch
    ahead = dict(steps, steps_depth=2, steps_depth_rows=1 << 20)  # at any batch (the default: one row)
    out.append(("steps b2", ahead))
    out.append(("steps b2 p32", dict(ahead, steps_prefetch=32)))
    for segments in (2, 4, 8):
        out.append((f"steps s{segments}", dict(steps, steps_segments=segments)))
        ahead = dict(steps, steps_segments=segments, steps_prefetch=32)
        out.append((f"steps s{segments} p32", ahead))
    for block_d in (4, 16):
        out.append((f"steps d{block_d}", dict(steps, steps_block_d=block_d)))
    return out


def main() -> None:
    from mambavl.bench.train_kernels import _scan_inputs_as_mixed
    from mambavl.ops.triton.scan import ScanTiles, selective_scan

    def extra(parser):
        parser.add_argument("--shapes", default="1x16384,16x768,1x1529")

    args, lm = parse(__doc__, extra)
    rows = []
    print(f"{torch.cuda.get_device_name()}; {args.preset}: d_inner {lm.d_inner}, d_state {lm.d_state}")
    for shape in args.shapes.split(","):
        batch, length = (int(x) for x in shape.split("x"))
        torch.manual_seed(0)
        kw = _scan_inputs_as_mixed(batch, lm.d_inner, lm.d_state, length, lm.dt_rank)
        kw = {k: v.detach() for k, v in kw.items()}
        kw["initial_state"] = torch.randn(batch, lm.d_inner, lm.d_state, device="cuda") * 0.1
        with torch.no_grad():
            base_y, base_h = None, None
            for name, tiles in chosen(candidates(), args.kernels):
                t = ScanTiles(**tiles)

                def call(t=t, kw=kw):
                    return selective_scan(**kw, delta_softplus=True, return_last_state=True, tiles=t)

                y, h = call()
                if base_y is None:
                    base_y, base_h = y.float(), h
                dy = (y.float() - base_y).abs().max().item()
                dh = (h - base_h).abs().max().item()
                ms = event_seconds(call, repeat=9, warmup=2) * 1e3
                rows.append(dict(shape=shape, kernel=name, ms=ms, max_dy=dy, max_dh=dh))
                print(f"{shape:>9} {name:<14} {ms:8.3f} ms   |Δy| {dy:.2e} |Δh| {dh:.2e}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), preset=args.preset, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
