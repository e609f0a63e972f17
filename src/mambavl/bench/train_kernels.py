"""`mambavl bench --kernels --train`: the training kernels, forward and forward + backward, at a preset's
full-size shapes, each against the PyTorch reference it replaces and, where importable, the seeds' own
kernels (mamba_ssm's CUDA selective scan, causal_conv1d, mamba_ssm's Triton norms and SSD), in one run.

For a Mamba-1 LM: the selective scan (Δ bias + softplus, D, the z gate), the whole mixer from in_proj to
out_proj (`ops.mamba1_mixer` against mamba_ssm's in_proj + `mamba_inner_fn`), the causal conv1d (bias,
SiLU) and the pre-norm RMSNorm with its residual add; for a Mamba-2 LM: the SSD chunked scan, the mixer
between in_proj and out_proj (`ops.mamba2_inner` against mamba_ssm's `mamba_split_conv1d_scan_combined`),
the conv1d over x, B and C, the RMSNorm and the gated, grouped RMSNorm. Shapes: `batch` rows of `length`
positions in bf16 (fp32 A, D and Δ bias, as the models hold them). Every timing is the median of CUDA-event
timed calls after warm-up; "fwd+bwd" is one forward and one backward with gradients for every input that
has one.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from mambavl.bench.timing import event_seconds


def _measure(make: Callable[[], tuple[Callable, dict]]) -> dict:
    """Forward and forward + backward time and the backward's extra peak memory of one implementation.
    `make()` returns (call(**inputs) -> output tensor or tuple, inputs)."""
    call, inputs = make()
    leaves = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]

    def forward():
        with torch.no_grad():
            call(**inputs)

    def forward_backward():
        out = call(**inputs)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        torch.autograd.grad(outs, leaves, grad_outputs=[torch.ones_like(o) for o in outs])

    try:
        fwd = event_seconds(forward)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        both = event_seconds(forward_backward)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    return {"fwd_ms": fwd * 1e3, "fwd_bwd_ms": both * 1e3, "extra_peak_mib": peak}


def _leaf(t: torch.Tensor, grad: bool = True) -> torch.Tensor:
    return t.requires_grad_(grad)


# ---- the ops at a preset's shapes ------------------------------------------------------------------------
def _scan_inputs(batch: int, dim: int, n: int, length: int) -> dict:
    kw = dict(device="cuda")
    bf = dict(device="cuda", dtype=torch.bfloat16)
    return dict(
        u=_leaf(torch.randn(batch, dim, length, **bf)),
        delta=_leaf(torch.randn(batch, dim, length, **bf) - 2),
        A=_leaf(-torch.rand(dim, n, **kw) * 8),
        B=_leaf(torch.randn(batch, n, length, **bf)),
        C=_leaf(torch.randn(batch, n, length, **bf)),
        D=_leaf(torch.ones(dim, **kw)),
        z=_leaf(torch.randn(batch, dim, length, **bf)),
        delta_bias=_leaf(torch.randn(dim, **kw) * 0.1),
    )


def _scan_inputs_as_mixed(batch: int, dim: int, n: int, length: int, rank: int) -> dict:
    """The scan's inputs laid out as Mamba1Mixer hands them over: u, Δ and z channel-contiguous views of
    [B, L, ·] tensors (z half of in_proj's output), B and C slices of x_proj's [B, L, rank + 2N] output."""
    bf = dict(device="cuda", dtype=torch.bfloat16)
    xz = torch.randn(batch, length, 2 * dim, **bf)
    x_dbl = torch.randn(batch, length, rank + 2 * n, **bf)
    return dict(
        u=_leaf(torch.randn(batch, length, dim, **bf).transpose(1, 2)),
        delta=_leaf((torch.randn(batch, length, dim, **bf) - 2).transpose(1, 2)),
        A=_leaf(-torch.rand(dim, n, device="cuda") * 8),
        B=_leaf(x_dbl[..., rank : rank + n].transpose(1, 2).detach()),
        C=_leaf(x_dbl[..., rank + n :].transpose(1, 2).detach()),
        D=_leaf(torch.ones(dim, device="cuda")),
        z=_leaf(xz[..., dim:].transpose(1, 2).detach()),
        delta_bias=_leaf(torch.randn(dim, device="cuda") * 0.1),
    )


def _channels_last_output(fn):
    """fn's [B, D, L] output handed on as [B, L, D], as the mixer's out_proj takes it: the gradient
    then comes back channel-contiguous."""
    return lambda **kw: fn(**kw).transpose(1, 2).contiguous()


def _mixer_inputs(batch: int, lm, length: int) -> dict:
    """The Mamba-1 mixer's input hidden [B, L, d_model] and its weights (fp32, as the model holds them)."""
    d, n, r = lm.d_inner, lm.d_state, lm.dt_rank
    f32 = dict(device="cuda")
    return dict(
        hidden=_leaf(torch.randn(batch, length, lm.d_model, device="cuda", dtype=torch.bfloat16)),
        in_proj_weight=_leaf(torch.randn(2 * d, lm.d_model, **f32) * lm.d_model**-0.5),
        conv_weight=_leaf(torch.randn(d, lm.d_conv, **f32) * 0.3),
        conv_bias=_leaf(torch.randn(d, **f32) * 0.1),
        x_proj_weight=_leaf(torch.randn(r + 2 * n, d, **f32) * d**-0.5),
        dt_proj_weight=_leaf(torch.randn(d, r, **f32) * r**-0.5),
        dt_bias=_leaf(torch.randn(d, **f32) * 0.1 - 3),
        A=_leaf(-torch.rand(d, n, **f32) * 8),
        D=_leaf(torch.ones(d, **f32)),
        out_proj_weight=_leaf(torch.randn(lm.d_model, d, **f32) * d**-0.5),
    )


def _ours_mixer(lm, backend: str):
    """`ops.mamba1_mixer` as Mamba1Mixer calls it in training, under bf16 autocast."""
    from mambavl import ops

    def call(hidden, in_proj_weight, out_proj_weight, **kw):
        with torch.autocast("cuda", torch.bfloat16):
            return ops.mamba1_mixer(
                hidden, in_proj_weight, None, out_proj_weight=out_proj_weight, out_proj_bias=None,
                dt_rank=lm.dt_rank, d_state=lm.d_state, backend=backend, **kw,
            )  # fmt: skip

    return call


def _peer_mixer(fn):
    """mamba_ssm's Mamba module in training: in_proj as W·hᵀ, then `mamba_inner_fn` (its default checkpoint
    level) on the same inputs, under bf16 autocast."""

    def call(hidden, in_proj_weight, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D,
             out_proj_weight):  # fmt: skip
        batch, length, width = hidden.shape
        with torch.autocast("cuda", torch.bfloat16):
            xz = in_proj_weight @ hidden.reshape(-1, width).t()  # [2D, B·L]
            xz = xz.view(-1, batch, length).transpose(0, 1)
            return fn(
                xz, conv_weight[:, None], conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight, None,
                A, None, None, D.float(), delta_bias=dt_bias.float(), delta_softplus=True,
            )  # fmt: skip

    return call


def _mamba2_inputs(batch: int, lm, length: int) -> dict:
    """The Mamba-2 mixer between in_proj and out_proj: in_proj's output zxbcdt [B, L, ·] (bf16) and the
    weights (fp32, as the model holds them)."""
    d, h, gn = lm.d_inner, lm.nheads, lm.ngroups * lm.d_state
    f32 = dict(device="cuda")
    return dict(
        zxbcdt=_leaf(torch.randn(batch, length, 2 * d + 2 * gn + h, device="cuda", dtype=torch.bfloat16)),
        conv_weight=_leaf(torch.randn(d + 2 * gn, lm.d_conv, **f32) * 0.3),
        conv_bias=_leaf(torch.randn(d + 2 * gn, **f32) * 0.1),
        dt_bias=_leaf(torch.randn(h, **f32) * 0.1 - 3),
        A=_leaf(-torch.rand(h, **f32) * 8),
        D=_leaf(torch.ones(d if lm.d_has_hdim else h, **f32)),
        norm_weight=_leaf(torch.ones(d, **f32)),
        out_proj_weight=_leaf(torch.randn(lm.d_model, d, **f32) * d**-0.5),
    )


def _ours_mamba2(lm, backend: str):
    """`ops.mamba2_inner` as Mamba2Mixer calls it in training, under bf16 autocast."""
    from mambavl import ops

    def call(**kw):
        with torch.autocast("cuda", torch.bfloat16):
            return ops.mamba2_inner(
                **kw, out_proj_bias=None, headdim=lm.headdim, ngroups=lm.ngroups, d_state=lm.d_state,
                chunk_size=lm.chunk_size, norm_eps=lm.gated_norm_eps,
                norm_group_size=lm.d_inner // lm.ngroups, norm_before_gate=lm.norm_before_gate,
                dt_limit=lm.dt_limit, backend=backend,
            )  # fmt: skip

    return call


def _peer_mamba2(lm, fn):
    """mamba_ssm's `mamba_split_conv1d_scan_combined` (its Mamba2 module's training path), same inputs."""

    def call(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight):
        with torch.autocast("cuda", torch.bfloat16):
            return fn(
                zxbcdt, conv_weight, conv_bias, dt_bias, A,
                D.view(lm.nheads, lm.headdim) if D.numel() == lm.d_inner else D, lm.chunk_size,
                dt_limit=tuple(lm.dt_limit), rmsnorm_weight=norm_weight, rmsnorm_eps=lm.gated_norm_eps,
                outproj_weight=out_proj_weight, headdim=lm.headdim, ngroups=lm.ngroups,
                norm_before_gate=lm.norm_before_gate,
            )  # fmt: skip

    return call


def _conv_inputs(batch: int, dim: int, width: int, length: int) -> dict:
    # as in the mixers: a [B, D, L] view of in_proj's [B, L, 2D] output
    x = torch.randn(batch, length, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    return dict(
        x=_leaf(x.detach()),
        weight=_leaf(torch.randn(dim, width, device="cuda") * 0.3),
        bias=_leaf(torch.randn(dim, device="cuda") * 0.1),
    )


def _norm_inputs(rows: int, width: int) -> dict:
    bf = dict(device="cuda", dtype=torch.bfloat16)
    return dict(
        x=_leaf(torch.randn(rows, width, **bf)),
        residual=_leaf(torch.randn(rows, width, device="cuda")),
        weight=_leaf(torch.ones(width, device="cuda")),
    )


def _ssd_inputs(batch: int, length: int, heads: int, p: int, groups: int, n: int) -> dict:
    bf = dict(device="cuda", dtype=torch.bfloat16)
    return dict(
        x=_leaf(torch.randn(batch, length, heads, p, **bf)),
        dt=_leaf(torch.randn(batch, length, heads, **bf) - 2),
        A=_leaf(-torch.rand(heads, device="cuda") * 8),
        B=_leaf(torch.randn(batch, length, groups, n, **bf)),
        C=_leaf(torch.randn(batch, length, groups, n, **bf)),
        D=_leaf(torch.ones(heads, device="cuda")),
        dt_bias=_leaf(torch.randn(heads, device="cuda") * 0.1),
    )


def _peer(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # not installed, or its CUDA extension missing
        return None


def _cases(lm, batch: int, length: int) -> dict[str, dict[str, Callable[[], tuple[Callable, dict]]]]:
    """op -> implementation -> make(); only implementations that can run here."""
    from mambavl import ops

    rows = batch * length
    cases: dict[str, dict] = {}

    def ours(fn, **fixed):
        return lambda **kw: fn(**kw, **fixed, backend="triton")

    def ref(fn, **fixed):
        return lambda **kw: fn(**kw, **fixed, backend="torch")

    if lm.uses("mamba1"):
        d, n = lm.d_inner, lm.d_state
        scan = lambda: _scan_inputs(batch, d, n, length)  # noqa: E731
        peer_scan = _peer("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")
        cases["selective_scan"] = {
            "ours": lambda: (ours(ops.selective_scan, delta_softplus=True), scan()),
            "torch": lambda: (ref(ops.selective_scan, delta_softplus=True), scan()),
        }
        if peer_scan is not None:
            cases["selective_scan"]["mamba_ssm"] = lambda: (
                lambda **kw: peer_scan(**kw, delta_softplus=True),
                scan(),
            )
        mixed = lambda: _scan_inputs_as_mixed(batch, d, n, length, lm.dt_rank)  # noqa: E731
        cases["selective_scan_mixer_layout"] = {
            "ours": lambda: (_channels_last_output(ours(ops.selective_scan, delta_softplus=True)), mixed()),
        }
        mixer = lambda: _mixer_inputs(batch, lm, length)  # noqa: E731
        cases["mamba1_mixer"] = {
            "ours": lambda: (_ours_mixer(lm, "triton"), mixer()),
            "torch": lambda: (_ours_mixer(lm, "torch"), mixer()),
        }
        peer_inner = _peer("mamba_ssm.ops.selective_scan_interface", "mamba_inner_fn")
        if peer_inner is not None:
            cases["mamba1_mixer"]["mamba_ssm"] = lambda: (_peer_mixer(peer_inner), mixer())
    if lm.uses("mamba2"):
        h, p, g, n = lm.nheads, lm.headdim, lm.ngroups, lm.d_state
        ssd = lambda: _ssd_inputs(batch, length, h, p, g, n)  # noqa: E731
        fixed = dict(chunk_size=lm.chunk_size, dt_softplus=True)
        cases["ssd"] = {
            "ours": lambda: (ours(ops.mamba_chunk_scan_combined, **fixed), ssd()),
            "torch": lambda: (ref(ops.mamba_chunk_scan_combined, **fixed), ssd()),
        }
        peer_ssd = _peer("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")
        if peer_ssd is not None:
            cases["ssd"]["mamba_ssm"] = lambda: (lambda **kw: peer_ssd(**kw, **fixed), ssd())
        if lm.gated_norm:
            inner2 = lambda: _mamba2_inputs(batch, lm, length)  # noqa: E731
            cases["mamba2_inner"] = {
                "ours": lambda: (_ours_mamba2(lm, "triton"), inner2()),
                "torch": lambda: (_ours_mamba2(lm, "torch"), inner2()),
            }
            peer_split = _peer("mamba_ssm.ops.triton.ssd_combined", "mamba_split_conv1d_scan_combined")
            if peer_split is not None:
                cases["mamba2_inner"]["mamba_ssm"] = lambda: (_peer_mamba2(lm, peer_split), inner2())
        gated = lambda: {  # noqa: E731
            "x": _leaf(torch.randn(rows, lm.d_inner, device="cuda", dtype=torch.bfloat16)),
            "weight": _leaf(torch.ones(lm.d_inner, device="cuda")),
            "z": _leaf(torch.randn(rows, lm.d_inner, device="cuda", dtype=torch.bfloat16)),
        }
        gfixed = dict(group_size=lm.d_inner // g, norm_before_gate=lm.norm_before_gate, eps=lm.gated_norm_eps)
        cases["rms_norm_gated"] = {
            "ours": lambda: (ours(ops.rms_norm_gated, **gfixed), gated()),
            "torch": lambda: (ref(ops.rms_norm_gated, **gfixed), gated()),
        }
        peer_gated = _peer("mamba_ssm.ops.triton.layernorm_gated", "rmsnorm_fn")
        if peer_gated is not None:
            cases["rms_norm_gated"]["mamba_ssm"] = lambda: (
                lambda x, weight, z: peer_gated(x, weight, None, z=z, **gfixed),
                gated(),
            )
    conv_dim = lm.d_inner + (2 * lm.ngroups * lm.d_state if lm.uses("mamba2") else 0)
    conv = lambda: _conv_inputs(batch, conv_dim, lm.d_conv, length)  # noqa: E731
    cases["causal_conv1d"] = {
        "ours": lambda: (ours(ops.causal_conv1d_fn, activation="silu"), conv()),
        "torch": lambda: (ref(ops.causal_conv1d_fn, activation="silu"), conv()),
    }
    peer_conv = _peer("causal_conv1d", "causal_conv1d_fn")
    if peer_conv is not None:
        cases["causal_conv1d"]["causal_conv1d"] = lambda: (
            lambda **kw: peer_conv(**kw, activation="silu"),
            conv(),
        )
    norm = lambda: _norm_inputs(rows, lm.d_model)  # noqa: E731
    nfixed = dict(eps=lm.norm_eps, prenorm=True, residual_in_fp32=True)
    cases["rms_norm_add"] = {
        "ours": lambda: (ours(ops.rms_norm, **nfixed), norm()),
        "torch": lambda: (ref(ops.rms_norm, **nfixed), norm()),
    }
    peer_norm = _peer("mamba_ssm.ops.triton.layer_norm", "rms_norm_fn")
    if peer_norm is not None:
        cases["rms_norm_add"]["mamba_ssm"] = lambda: (
            lambda x, residual, weight: peer_norm(x, weight, None, residual=residual, **nfixed),
            norm(),
        )
    return cases


def scan_candidates(slots: tuple[int, ...] = (1, 4)) -> list[tuple[int, int, int, int, bool, int | None]]:
    """Candidate (chunk, channels a program, warps, dB/dC copies, inputs made time-contiguous, register cap)
    of the training scan: first the channel-contiguous tiles of before, then the default tile and its
    neighbour under register caps (more programs an SM against spills), then time-contiguous tiles that give
    each thread 2 to 16 steps of a tile, fewest dB/dC copies first, then the longest chunks (from 1024 on,
    one chunk spans a whole 936-step row)."""
    import itertools

    capped = [(128, block_d, 1, 1, True, regs) for block_d in (4, 2) for regs in (None, 168, 128)]
    grid = itertools.product(slots, (1024, 512, 256, 128), (1, 2, 4), (1, 2, 4, 8))
    rest = [
        (chunk, block_d, warps, copies, True, None)
        for copies, chunk, block_d, warps in grid
        if 2 <= chunk * block_d // (32 * warps) <= 16
    ]
    return [(128, 4, 1, 1, False, None), *capped, *(c for c in rest if c not in capped)]


def sweep_scan(
    lm, batch: int, length: int, say=print, budget_s: float = 180.0, candidates: list | None = None
) -> list[dict]:
    """Forward + backward time of the Mamba-1 scan, its inputs laid out as the mixer hands them over, for
    every candidate `ScanTiles` of training (`scan_candidates()` unless given), fastest first; stops trying
    new ones after `budget_s`."""
    import time

    from mambavl.ops.triton.scan import DEFAULT_TILES, ScanTiles, selective_scan

    inputs = _scan_inputs_as_mixed(batch, lm.d_inner, lm.d_state, length, lm.dt_rank)
    leaves = list(inputs.values())
    rows, start = [], time.perf_counter()
    for chunk, block_d, warps, slots, major, regs in candidates or scan_candidates():
        if time.perf_counter() - start > budget_s:
            say(f"sweep: stopped after {budget_s:.0f} s")
            break
        tiles = ScanTiles(
            block_t=DEFAULT_TILES.block_t, block_d=DEFAULT_TILES.block_d, num_warps=DEFAULT_TILES.num_warps,
            chunk=chunk, train_block_d=block_d, train_warps=warps, bwd_slots=slots, train_time_major=major,
            train_maxnreg=regs,
        )  # fmt: skip

        def step(tiles=tiles):
            y = selective_scan(**inputs, delta_softplus=True, tiles=tiles)
            torch.autograd.grad(y, leaves, torch.ones_like(y))

        try:
            ms = event_seconds(step, repeat=5, warmup=1) * 1e3
        except Exception as e:  # a launch that cannot run here (registers, shared memory)
            say(f"sweep {tiles}: {type(e).__name__}")
            continue
        row = dict(
            chunk=chunk, train_block_d=block_d, train_warps=warps, bwd_slots=slots, time_major=major,
            maxnreg=regs,
        )  # fmt: skip
        rows.append(row | {"fwd_bwd_ms": ms})
        say(f"sweep {row}: {ms:8.3f} ms")
    return sorted(rows, key=lambda r: r["fwd_bwd_ms"])


def time_optimizer(lm, say=print, repeat: int = 5) -> dict:
    """One optimizer step of `lm`'s parameters (random fp32 weights and gradients at full size), clipping
    included, as the trainer takes it (`recipe.optimizer` and `recipe.clip_and_step`): torch's fused AdamW
    and TritonAdamW, same parameters, same gradients, in this process."""
    from types import SimpleNamespace

    from mambavl.lm import LanguageModel
    from mambavl.train.recipe import clip_and_step, optimizer

    with torch.device("cuda"):
        model = LanguageModel(lm)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=gen) * 1e-3
    result = {"params": sum(p.numel() for p in params), "tensors": len(params)}
    for kernels, name in (("torch", "torch_fused_adamw"), ("triton", "triton_adamw")):
        cfg = SimpleNamespace(weight_decay=0.1, learning_rate=1e-5, adamw_kernels=kernels)  # what it reads
        opt = optimizer(model, cfg)
        result[f"{name}_ms"] = event_seconds(lambda o=opt: clip_and_step(o, params, 1.0), repeat, 2) * 1e3
        say(f"optimizer step with clipping, {name}: {result[f'{name}_ms']:.2f} ms")
        del opt
        torch.cuda.empty_cache()
    return result


def sweep_prefill_scan(lm, length: int = 16384, say=print, budget_s: float = 90.0) -> list[dict]:
    """Time of the Mamba-1 scan without a gradient (prefill: one sequence of `length` steps, the mixer's
    layout) under every candidate inference launch, fastest first: the step-by-step kernel (channels a
    program, warps, segments of the sequence run side by side) and the tiled one (inputs made
    time-contiguous or not, steps a tile, channels, warps)."""
    import dataclasses
    import itertools
    import time

    from mambavl.ops.triton.scan import DEFAULT_TILES, selective_scan

    inputs = {
        k: v.detach() for k, v in _scan_inputs_as_mixed(1, lm.d_inner, lm.d_state, length, lm.dt_rank).items()
    }
    steps = [
        dict(prefill="steps", steps_block_d=d, steps_warps=w, steps_segments=k)
        for k, (d, w) in itertools.product((1, 2, 4, 8), ((8, 2), (4, 1), (8, 1), (16, 2), (16, 4)))
    ]
    tiled_grid = [(False, 16, 2, 1), *itertools.product((True,), (16, 32, 64), (1, 2, 4, 8), (1, 2, 4))]
    tiled = [
        dict(prefill="tiles", prefill_time_major=major, block_t=t, block_d=d, num_warps=w)
        for major, t, d, w in tiled_grid
        if 1 <= t * d * 16 // (32 * w) <= 64
    ]
    rows, start = [], time.perf_counter()
    for launch in steps + tiled:
        if time.perf_counter() - start > budget_s:
            break
        tiles = dataclasses.replace(DEFAULT_TILES, **launch)
        try:
            with torch.no_grad():
                scan = partial(selective_scan, **inputs, delta_softplus=True, tiles=tiles)
                ms = event_seconds(scan, 5, 1) * 1e3
        except Exception as e:
            say(f"prefill sweep {launch}: {type(e).__name__}")
            continue
        rows.append(launch | {"prefill_ms": ms})
        say(f"prefill sweep {rows[-1]}")
    return sorted(rows, key=lambda r: r["prefill_ms"])


CONV_BWD_CANDIDATES = {
    # the Mamba-1 node's channel-major x (the four-column backward's tiles); the mixers' channel-contiguous
    # views (Mamba-2's xBC) run the step-by-step kernel, which has no tile to choose
    "time": ((16, 64, 4), (16, 32, 4), (8, 128, 4), (4, 256, 4), (8, 64, 2), (32, 64, 8)),
}


def _conv_time_inputs(batch: int, dim: int, width: int, length: int) -> dict:
    """The conv's inputs as the Mamba-1 node lays x out: a channel-major, time-contiguous [B, D, L] half of
    a [2D, B, L'] projection (rows padded to 16 steps)."""
    padded = -(-length // 16) * 16
    inputs = _conv_inputs(batch, dim, width, padded)
    inputs["x"] = _leaf(
        torch.randn(2 * dim, batch, padded, device="cuda", dtype=torch.bfloat16)[dim:]
        .transpose(0, 1)
        .detach()
    )
    return inputs


def sweep_conv(lm, batch: int, length: int, say=print) -> list[dict]:
    """Forward + backward time of the causal conv1d for candidate backward tiles and program counts, on
    the layouts whose kernel takes a tile (`CONV_BWD_CANDIDATES`), fastest first within each."""
    from mambavl import ops
    from mambavl.ops.triton import conv

    saved = dict(conv.TILES), conv.PROGRAMS_PER_SM
    layouts = {"time": _conv_time_inputs(batch, lm.d_inner, lm.d_conv, length)}
    rows = []
    try:
        for layout, inputs in layouts.items():
            leaves = list(inputs.values())
            for tile in CONV_BWD_CANDIDATES[layout]:
                for per_sm in (8, 32, 128):
                    conv.TILES[f"bwd_{layout}"], conv.PROGRAMS_PER_SM = tile, per_sm

                    def step(inputs=inputs, leaves=leaves):
                        y = ops.causal_conv1d_fn(**inputs, activation="silu", backend="triton")
                        torch.autograd.grad(y, leaves, torch.ones_like(y))

                    try:
                        ms = event_seconds(step, repeat=5, warmup=1) * 1e3
                    except Exception as e:
                        say(f"conv sweep {layout} {tile} {per_sm}: {type(e).__name__}")
                        continue
                    rows.append(
                        {"layout": layout, "bwd_tile": tile, "programs_per_sm": per_sm, "fwd_bwd_ms": ms}
                    )
                    say(f"conv sweep {layout} tile {tile} programs/SM {per_sm}: {ms:8.3f} ms")
                conv.TILES.update(saved[0])
    finally:
        conv.TILES.update(saved[0])
        conv.PROGRAMS_PER_SM = saved[1]
    return sorted(rows, key=lambda r: (r["layout"], r["fwd_bwd_ms"]))


def run_train_kernels(
    preset: str,
    out: Path,
    batch: int = 8,
    length: int = 936,
    say=print,
    sweep: bool = False,
    sweep_s: float = 180.0,
    ops: bool = True,
) -> dict:
    """Times every training kernel of `preset`'s LM; writes out/train_kernels.json and returns it. With
    `sweep`, also the Mamba-1 scan under every candidate tile (`sweep_scan`, `sweep_prefill_scan`; the first
    for up to `sweep_s` seconds, the second a third of that) and the conv's; without `ops`, the scan's
    sweeps alone."""
    from mambavl.presets import PRESETS

    if not torch.cuda.is_available():
        raise RuntimeError("bench --kernels --train times CUDA kernels: it needs a GPU")
    lm = PRESETS[preset].lm
    result: dict = {
        "preset": preset,
        "batch": batch,
        "length": length,
        "device": torch.cuda.get_device_name(),
        "dtype": "bfloat16 activations, fp32 A / D / biases / weights of norms and conv",
        "ops": {},
    }
    for op, impls in (_cases(lm, batch, length) if ops else {}).items():
        result["ops"][op] = {}
        for name, make in impls.items():
            entry = _measure(make)
            result["ops"][op][name] = entry
            torch.cuda.empty_cache()
            if "error" in entry:
                say(f"{op:16s} {name:14s} {entry['error']}")
            else:
                say(
                    f"{op:16s} {name:14s} fwd {entry['fwd_ms']:8.3f} ms"
                    f"   fwd+bwd {entry['fwd_bwd_ms']:8.3f} ms"
                    f"   +{entry['extra_peak_mib']:8.0f} MiB"
                )
    if ops:
        try:
            result["optimizer"] = time_optimizer(lm, say)
        except torch.cuda.OutOfMemoryError:  # weights, gradients and two moments at full size
            result["optimizer"] = {"error": "out of memory"}
            say("optimizer step: out of memory")
        torch.cuda.empty_cache()
    if sweep and lm.uses("mamba1"):
        result["scan_tile_sweep"] = sweep_scan(lm, batch, length, say, budget_s=sweep_s)
        say(f"fastest: {result['scan_tile_sweep'][:3]}")
        result["prefill_scan_sweep"] = sweep_prefill_scan(lm, say=say, budget_s=sweep_s / 3)
        say(f"fastest: {result['prefill_scan_sweep'][:3]}")
        if ops:
            result["conv_tile_sweep"] = sweep_conv(lm, batch, length, say)
            best = {r["layout"]: r for r in reversed(result["conv_tile_sweep"])}  # the first of each
            say(f"fastest: {list(best.values())}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_kernels.json").write_text(json.dumps(result, indent=2))
    return result
