"""The Mamba-1 training scan's backward side by side (needs a GPU): the adjoint's reverse scan as Triton's
`reverse=True` scan against the forward scan over reversed inputs (`bwd_flip`), at several chunk lengths
and channel blocks, forward + backward on the inputs laid out as the mixer hands them over (bf16 u, Δ and z
channel-contiguous views, B and C slices of x_proj's output), at a preset's sizes (cobra+3b by default),
batch × length as in `bench --train`; mamba_ssm's CUDA `selective_scan_fn` beside them where it is
importable. Every candidate's gradients are compared with the first candidate's (the largest difference
relative to each gradient's largest entry), and its times are medians of CUDA-event timings: the training
forward (with gradients enabled: the kernel that keeps the chunk states), and forward + backward; the
backward's time is their difference.

    python benchmarks/scan_train.py [--preset cobra+3b] [--batch 8] [--length 936] [--out FILE]
        [--kernels reverse,flip,...]
"""

from __future__ import annotations

import json

import torch
from scan_common import chosen, parse

from mambavl.bench.timing import event_seconds


def candidates() -> list[tuple[str, dict]]:
    """(name, ScanTiles fields), each tile named in full (the defaults move): the kernel before `bwd_flip`
    first (Triton's reverse scan, chunk 128, 4 channels a program), then the flipped one at that tile, at
    shorter chunks and more channels a program, under register caps (more warps a multiprocessor;
    `benchmarks/scan_sass.py` counts what each costs in spills), and with its dB/dC adds spread over four
    copies. "flip c64 d4" is the default since the sixteenth pass."""
    before = dict(chunk=128, train_block_d=4, train_maxnreg=None)
    out = [("reverse", dict(before, bwd_flip=False)), ("flip", dict(before, bwd_flip=True))]
    for chunk, block_d, regs in ((64, 8, None), (64, 8, 168), (64, 4, None), (64, 4, 168), (128, 4, 168)):
        name = f"flip c{chunk} d{block_d}" + (f" r{regs}" if regs else "")
        out.append((name, dict(chunk=chunk, train_block_d=block_d, train_maxnreg=regs, bwd_flip=True)))
    out.append(("reverse c64 d4", dict(chunk=64, train_block_d=4, train_maxnreg=None, bwd_flip=False)))
    out.append(("flip slots4", dict(before, bwd_flip=True, bwd_slots=4)))
    return out


def _peer():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


def main() -> None:
    from mambavl.bench.train_kernels import _scan_inputs_as_mixed
    from mambavl.ops.triton.scan import ScanTiles, selective_scan

    def extra(parser):
        parser.add_argument("--batch", type=int, default=8)
        parser.add_argument("--length", type=int, default=936)

    args, lm = parse(__doc__, extra)
    print(f"{torch.cuda.get_device_name()}; {args.preset}: d_inner {lm.d_inner}, d_state {lm.d_state}, "
          f"{args.batch} x {args.length}")  # fmt: skip
    torch.manual_seed(0)
    kw = _scan_inputs_as_mixed(args.batch, lm.d_inner, lm.d_state, args.length, lm.dt_rank)
    leaves = list(kw.values())
    gy = torch.randn(args.batch, args.length, lm.d_inner, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    impls = chosen(candidates(), args.kernels)

    def ours(tiles: ScanTiles):
        return lambda: selective_scan(**kw, delta_softplus=True, tiles=tiles)

    calls = [(name, ours(ScanTiles(**tiles))) for name, tiles in impls]
    peer = _peer()
    if peer is not None:
        peer_kw = dict(kw, B=kw["B"].contiguous(), C=kw["C"].contiguous())
        calls.append(("mamba_ssm (CUDA)", lambda: peer(**peer_kw, delta_softplus=True)))
    rows, base = [], None
    for name, call in calls:

        def both(call=call):
            return torch.autograd.grad(call(), leaves, gy)

        def forward(call=call):  # the training forward: it keeps the chunk states for a backward
            call()

        grads = both()
        if base is None:
            base = grads
        diff = max(
            ((g.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
            for g, b in zip(grads, base, strict=True)
        )
        fwd = event_seconds(forward, repeat=9, warmup=2) * 1e3
        total = event_seconds(both, repeat=9, warmup=2) * 1e3
        rows.append(dict(kernel=name, fwd_ms=fwd, fwd_bwd_ms=total, bwd_ms=total - fwd, max_rel_diff=diff))
        print(f"{name:<18} fwd {fwd:7.3f} ms   fwd+bwd {total:7.3f} ms   bwd {total - fwd:7.3f} ms   "
              f"grads vs first {diff:.1e}", flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), preset=args.preset, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
