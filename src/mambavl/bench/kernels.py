"""`mambavl bench --kernels`: the decode-step kernels at a preset's full-size shapes, each against what
it replaces, in one run.

- **linear**: the skinny Triton linear (`ops.triton.gemv`) against cuBLAS (F.linear) for every
  projection of a decode step (in_proj, out_proj, x_proj, the LM head) at batch 1, 8 and 16, as
  microseconds per call, weight bytes per second, and the fraction of the measured copy bandwidth.
- **mamba1 step** (Mamba-1 presets): the fused step between the projections (`ops.triton.step`, two
  kernels) against the same math as separate kernels (Triton conv update, cuBLAS x_proj and dt_proj,
  Triton state update), at batch 1, 4, 8 and 64: the data behind `FUSED_MAX_BATCH`.

Every timing is a CUDA graph of many calls, replayed, so Python launch costs do not count (a decode
step runs as a graph too), and the calls rotate over enough weight copies (over 512 MiB) that no
weight is served from the L2 cache, as in a real step through 64 layers. `--sweep` also times the
candidate tiles of each kernel and reports the fastest, the data behind the kernels' TILES choices.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROTATE_BYTES = 512 * 2**20
CALLS = 64


def graph_time(fn: Callable[[int], object], calls: int = CALLS, repeat: int = 5) -> float:
    """Seconds per call of fn(i) for i in range(calls), captured as one CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(calls):  # compiles and warms outside the graph
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


def projection_shapes(lm) -> dict[str, tuple[int, int]]:
    """(out, in) of each matrix a decode step multiplies, from an LMConfig."""
    shapes = {"lm_head": (lm.vocab_size, lm.d_model)}
    if lm.uses("mamba1"):
        shapes |= {
            "mamba1.in_proj": (2 * lm.d_inner, lm.d_model),
            "mamba1.x_proj": (lm.dt_rank + 2 * lm.d_state, lm.d_inner),
            "mamba1.out_proj": (lm.d_model, lm.d_inner),
        }
    if lm.uses("mamba2"):
        conv_dim = lm.d_inner + 2 * lm.ngroups * lm.d_state
        shapes |= {
            "mamba2.in_proj": (lm.d_inner + conv_dim + lm.nheads, lm.d_model),
            "mamba2.out_proj": (lm.d_model, lm.d_inner),
        }
    return shapes


def _copies(make: Callable[[], object], nbytes: int) -> list:
    return [make() for _ in range(max(2, -(-ROTATE_BYTES // max(nbytes, 1))))]


def linear_table(lm, dtype: torch.dtype, batches: list[int], bandwidth: float, sweep: bool) -> list[dict]:
    from mambavl.ops.triton import gemv

    rows = []
    for (name, (n, k)), batch in itertools.product(projection_shapes(lm).items(), batches):
        nbytes = n * k * torch.finfo(dtype).bits // 8
        weights = _copies(lambda n=n, k=k: torch.randn(n, k, device="cuda", dtype=dtype) * k**-0.5, nbytes)
        x = torch.randn(batch, k, device="cuda", dtype=dtype)
        ours = graph_time(lambda i, x=x, w=weights: gemv.skinny_linear(x, w[i % len(w)]))
        cublas = graph_time(lambda i, x=x, w=weights: F.linear(x, w[i % len(w)]))
        row = dict(
            op=name, out=n, inp=k, batch=batch, weight_mb=nbytes / 1e6,
            ours_us=ours * 1e6, cublas_us=cublas * 1e6,
            ours_tb_s=nbytes / ours / 1e12, cublas_tb_s=nbytes / cublas / 1e12,
            ours_of_copy=nbytes / ours / bandwidth, cublas_of_copy=nbytes / cublas / bandwidth,
        )  # fmt: skip
        if sweep:
            key = gemv.tile_class(n)
            saved, best = gemv.TILES[key], None
            for tile in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4, 6)):
                gemv.TILES[key] = tile
                try:
                    t = graph_time(lambda i, x=x, w=weights: gemv.skinny_linear(x, w[i % len(w)]), repeat=3)
                except Exception:  # a tile that does not fit the GPU's shared memory
                    continue
                if best is None or t < best[0]:
                    best = (t, tile)
            gemv.TILES[key] = saved
            row["best_tile"], row["best_us"] = best[1], best[0] * 1e6
        rows.append(row)
        del weights
    return rows


def step_table(lm, dtype: torch.dtype, batches: list[int], sweep: bool) -> list[dict]:
    """The fused Mamba-1 step against the same math in separate kernels."""
    from mambavl import ops
    from mambavl.lm.mamba1 import Mamba1Mixer, decay_rates
    from mambavl.ops.triton import step as fused_step

    rows = []
    with torch.no_grad():
        layer = Mamba1Mixer(lm).to("cuda", dtype)
        A = decay_rates(layer)
        weights = dict(
            conv_weight=layer.conv1d.weight[:, 0].contiguous(), conv_bias=layer.conv1d.bias,
            x_proj_weight=layer.x_proj.weight, dt_proj_weight=layer.dt_proj.weight,
            dt_proj_bias=layer.dt_proj.bias, A=A, D=layer.D,
        )  # fmt: skip
        nbytes = sum(t.numel() * t.element_size() for t in weights.values() if t is not None)
        copies = _copies(lambda: {k: None if v is None else v.clone() for k, v in weights.items()}, nbytes)
        del layer
    d, r, n = lm.d_inner, lm.dt_rank, lm.d_state
    for batch in batches:
        states = [dict(conv_state=torch.zeros(batch, d, lm.d_conv, device="cuda"),
                       ssm_state=torch.zeros(batch, d, n, device="cuda")) for _ in copies]  # fmt: skip
        xz = torch.randn(batch, 2 * d, device="cuda", dtype=dtype)

        def fused(i, xz=xz, states=states):  # the fused kernels at every batch size, not only where used
            return fused_step.mamba1_step(xz, **states[i % len(copies)], **copies[i % len(copies)])

        def separate(i, xz=xz, states=states):
            w, state = copies[i % len(copies)], states[i % len(copies)]
            x, z = xz.chunk(2, dim=-1)
            x = ops.causal_conv1d_update(x, state["conv_state"], w["conv_weight"], w["conv_bias"], "silu")
            dt, B, C = F.linear(x, w["x_proj_weight"]).split([r, n, n], dim=-1)
            dt = dt @ w["dt_proj_weight"].T
            return ops.selective_state_update(
                state["ssm_state"],
                x,
                dt,
                w["A"],
                B,
                C,
                w["D"],
                z=z,
                dt_bias=w["dt_proj_bias"],
                dt_softplus=True,
            )

        with torch.no_grad():
            row = dict(batch=batch, fused_us=graph_time(fused) * 1e6, separate_us=graph_time(separate) * 1e6)
            if sweep:
                saved, best = (fused_step.BLOCK_CONV, fused_step.BLOCK_SCAN), None
                for tile in itertools.product((16, 32, 64, 128), (16, 32, 64, 128)):
                    fused_step.BLOCK_CONV, fused_step.BLOCK_SCAN = tile
                    t = graph_time(fused, repeat=3)
                    if best is None or t < best[0]:
                        best = (t, tile)
                fused_step.BLOCK_CONV, fused_step.BLOCK_SCAN = saved
                row["best_tile"], row["best_us"] = best[1], best[0] * 1e6
        rows.append(row)
    return rows


def run_kernels(preset: str, out: Path, dtype: str = "bfloat16", sweep: bool = False, say=print) -> dict:
    from mambavl.bench.ours import copy_bandwidth
    from mambavl.presets import PRESETS

    if not torch.cuda.is_available():
        raise RuntimeError("--kernels measures CUDA kernels: it needs a GPU")
    torch.manual_seed(0)
    torch_dtype = getattr(torch, dtype)
    lm = PRESETS[preset].lm
    bandwidth = copy_bandwidth(torch.device("cuda"))
    result = dict(
        preset=preset, dtype=dtype, device=torch.cuda.get_device_name(), copy_bandwidth_tb_s=bandwidth / 1e12,
        linear=linear_table(lm, torch_dtype, [1, 8, 16], bandwidth, sweep),
    )  # fmt: skip
    if lm.uses("mamba1"):
        result["mamba1_step"] = step_table(lm, torch_dtype, [1, 4, 8, 64], sweep)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(result, indent=1))
    say(f"{result['device']}: copy bandwidth {result['copy_bandwidth_tb_s']:.2f} TB/s")
    say("linear (µs per call; TB/s of weight; fraction of copy bandwidth): ours vs cuBLAS")
    for r in result["linear"]:
        best = f"  best tile {r['best_tile']} {r['best_us']:.1f} µs" if "best_tile" in r else ""
        say(
            f"  {r['op']:16s} {r['out']:>6d}x{r['inp']:<6d} b{r['batch']:<3d} "
            f"ours {r['ours_us']:7.1f} µs {r['ours_tb_s']:.2f} TB/s ({r['ours_of_copy']:.0%})   "
            f"cuBLAS {r['cublas_us']:7.1f} µs {r['cublas_tb_s']:.2f} TB/s ({r['cublas_of_copy']:.0%}){best}"
        )
    for r in result.get("mamba1_step", []):
        best = f"  best tile {r['best_tile']} {r['best_us']:.1f} µs" if "best_tile" in r else ""
        say(
            f"  mamba1 step b{r['batch']:<3d} fused {r['fused_us']:6.1f} µs   "
            f"separate {r['separate_us']:6.1f} µs{best}"
        )
    return result
