"""The Mamba-1 prefill scan where the model calls it, against the kernel sweep's inputs (needs a GPU).

One full-size Mamba-1 mixer of a preset (cobra+3b by default, bf16, random weights) runs over `--length`
positions from a state, as a prefill does. The scan's arguments are kept from that call, and the scan is
timed on them (CUDA events, median of 7 calls), then with each difference from the sweep's case removed:
no initial state, no returned last state, and the sweep's own inputs (`bench --kernels --train --sweep`)
with each real input swapped in one at a time. Where the two timings differ, this says why.

    python benchmarks/scan_in_place.py [--preset cobra+3b] [--length 16384]
"""

from __future__ import annotations

import argparse

import torch

from mambavl.bench.timing import event_seconds


def median_ms(fn) -> float:
    return event_seconds(fn, repeat=7, warmup=1) * 1e3


def main() -> None:
    import mambavl.ops.triton.scan as triton_scan
    from mambavl.bench.train_kernels import _scan_inputs_as_mixed
    from mambavl.lm.mamba1 import Mamba1Mixer
    from mambavl.presets import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cobra+3b")
    parser.add_argument("--length", type=int, default=16384)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark times CUDA kernels: it needs a GPU")
    lm = PRESETS[args.preset].lm
    torch.manual_seed(0)
    with torch.no_grad():
        mixer = Mamba1Mixer(lm).to("cuda", torch.bfloat16)
        hidden = torch.randn(1, args.length, lm.d_model, device="cuda", dtype=torch.bfloat16)
        kept: dict = {}
        scan = triton_scan.selective_scan
        names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "return_last_state",
                 "initial_state")  # fmt: skip

        def keep(*a, **k):
            kept.update(zip(names, a, strict=False), **k)
            return scan(*a, **k)

        triton_scan.selective_scan = keep
        try:
            mixer(hidden, state=mixer.new_state(1, "cuda"))
        finally:
            triton_scan.selective_scan = scan
        state = mixer.new_state(1, "cuda")

        def from_state():
            return mixer(hidden, state={k: v.clone() for k, v in state.items()})

        rows = {
            "mixer from a state": median_ms(from_state),
            "mixer from zeros (the training path)": median_ms(lambda: mixer(hidden)),
            "scan in place": median_ms(lambda: scan(**kept)),
            "scan, no initial state": median_ms(lambda: scan(**(kept | {"initial_state": None}))),
            "scan, neither state": median_ms(
                lambda: scan(**(kept | {"initial_state": None, "return_last_state": False}))
            ),
        }
        sweep = {
            k: v.detach()
            for k, v in _scan_inputs_as_mixed(1, lm.d_inner, lm.d_state, args.length, lm.dt_rank).items()
        }
        rows["scan on the sweep's inputs"] = median_ms(lambda: scan(**sweep, delta_softplus=True))
        for name in ("u", "delta", "B", "C", "z", "A"):
            swapped = sweep | {name: kept[name]}
            rows[f"sweep's inputs, real {name}"] = median_ms(lambda s=swapped: scan(**s, delta_softplus=True))
    print(f"{args.preset}, {args.length} positions, {torch.cuda.get_device_name()} (ms a layer, median of 7)")
    for name, ms in rows.items():
        print(f"  {name:40s} {ms:7.3f}")


if __name__ == "__main__":
    main()
