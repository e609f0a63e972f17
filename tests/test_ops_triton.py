"""Triton kernels against their PyTorch references: on the GPU when there is one, else in Triton's
interpreter (TRITON_INTERPRET=1, set by conftest), on small shapes with odd sizes."""

from __future__ import annotations

import pytest
import torch

from mambavl import ops
from mambavl.ops.dispatch import backend_for

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from mambavl.ops.triton.scan import _timestep_fast  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _mamba1(batch=3, d=37, n=5, dtype=torch.float32):
    t = dict(device=DEVICE)
    return dict(
        state=torch.randn(batch, d, n, **t),
        x=torch.randn(batch, d, **t).to(dtype),
        dt=torch.randn(batch, d, **t).to(dtype),
        A=-torch.rand(d, n, **t) * 4,
        B=torch.randn(batch, n, **t).to(dtype),
        C=torch.randn(batch, n, **t).to(dtype),
        D=torch.randn(d, **t),
        z=torch.randn(batch, d, **t).to(dtype),
        dt_bias=torch.randn(d, **t),
    )


def _mamba2(batch=2, heads=4, p=6, n=16, groups=2, dtype=torch.float32):
    t = dict(device=DEVICE)
    A = -torch.rand(heads, **t) * 4
    return dict(
        state=torch.randn(batch, heads, p, n, **t),
        x=torch.randn(batch, heads, p, **t).to(dtype),
        dt=torch.randn(batch, heads, **t)[..., None].expand(batch, heads, p).to(dtype),  # per head, stride 0
        A=A[:, None, None].expand(heads, p, n),
        B=torch.randn(batch, groups, n, **t).to(dtype),
        C=torch.randn(batch, groups, n, **t).to(dtype),
        D=torch.randn(heads, **t)[:, None].expand(heads, p),
        z=torch.randn(batch, heads, p, **t).to(dtype),
        dt_bias=torch.randn(heads, **t)[:, None].expand(heads, p),
    )


@pytest.mark.parametrize("layout", [_mamba1, _mamba2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "options", [dict(), dict(dt_softplus=True), dict(dt_softplus=True, dt_limit=(0.1, 0.5))]
)
@pytest.mark.parametrize("drop", [(), ("D", "z", "dt_bias")])
def test_selective_state_update_triton_equals_reference(layout, dtype, options, drop):
    inputs = layout(dtype=dtype)
    for name in drop:
        inputs[name] = None
    ref_state, tri_state = inputs["state"].clone(), inputs["state"].clone()
    y_ref = ops.selective_state_update(**(inputs | {"state": ref_state}), **options, backend="torch")
    y_tri = ops.selective_state_update(**(inputs | {"state": tri_state}), **options, backend="triton")
    assert y_tri.dtype == y_ref.dtype and y_tri.shape == y_ref.shape
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(tri_state, ref_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_tri.float(), y_ref.float(), **tol)


def test_backend_choice(monkeypatch):
    cpu = torch.zeros(1)
    assert backend_for(cpu) == "torch"  # auto: the reference for CPU tensors
    monkeypatch.setenv("MAMBAVL_BACKEND", "torch")
    assert backend_for(cpu) == "torch"
    monkeypatch.setenv("MAMBAVL_BACKEND", "fast")
    with pytest.raises(ValueError, match="MAMBAVL_BACKEND"):
        backend_for(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            backend_for(cpu, "triton")


@pytest.mark.parametrize("width,state_len", [(4, 3), (4, 6), (2, 1)])
@pytest.mark.parametrize("steps", [None, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,activation", [(True, "silu"), (False, None)])
def test_causal_conv1d_update_triton_equals_reference(width, state_len, steps, dtype, bias, activation):
    batch, dim = 3, 70  # not a multiple of the channel block
    shape = (batch, dim) if steps is None else (batch, dim, steps)
    x = torch.randn(*shape, device=DEVICE).to(dtype)
    state = torch.randn(batch, dim, state_len, device=DEVICE)
    weight = torch.randn(dim, width, device=DEVICE)
    b = torch.randn(dim, device=DEVICE) if bias else None
    ref_state, tri_state = state.clone(), state.clone()
    y_ref = ops.causal_conv1d_update(x, ref_state, weight, b, activation, backend="torch")
    y_tri = ops.causal_conv1d_update(x, tri_state, weight, b, activation, backend="triton")
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(tri_state, ref_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_tri.float(), y_ref.float(), **tol)


@pytest.mark.parametrize("dim", [64, 97])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "with_residual,prenorm,residual_in_fp32",
    [(False, False, False), (True, True, True), (True, True, False), (True, False, False)],
)
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_triton_equals_reference(dim, dtype, with_residual, prenorm, residual_in_fp32, with_weight):
    x = torch.randn(2, 5, dim, device=DEVICE).to(dtype)
    residual = torch.randn(2, 5, dim, device=DEVICE) if with_residual else None
    weight = torch.randn(dim, device=DEVICE) if with_weight else None
    args = (x, weight, 1e-5, residual, prenorm, residual_in_fp32)
    ref = ops.rms_norm(*args, backend="torch")
    tri = ops.rms_norm(*args, backend="triton")
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    for r, t in zip(ref if prenorm else (ref,), tri if prenorm else (tri,), strict=True):
        assert r.dtype == t.dtype
        torch.testing.assert_close(t.float(), r.float(), **tol)


def _scan_inputs(batch, dim, n, length, groups, dtype):
    t = dict(device=DEVICE)
    bc_shape = (batch, n, length) if groups is None else (batch, groups, n, length)
    return dict(
        u=torch.randn(batch, dim, length, **t).to(dtype),
        delta=(torch.randn(batch, dim, length, **t) * 0.5).to(dtype),
        A=-torch.rand(dim, n, **t) * 3,
        B=torch.randn(*bc_shape, **t).to(dtype),
        C=torch.randn(*bc_shape, **t).to(dtype),
        D=torch.randn(dim, **t),
        z=torch.randn(batch, dim, length, **t).to(dtype),
        delta_bias=torch.randn(dim, **t) * 0.3,
        initial_state=torch.randn(batch, dim, n, **t),
    )


@pytest.mark.parametrize(
    "batch,dim,n,length,groups",
    [
        (2, 37, 5, 45, None),  # odd channels and states, a ragged last chunk
        (1, 8, 16, 1, None),  # one step
        (2, 12, 16, 64, 2),  # grouped B/C, whole chunks
        (1, 16, 32, 33, None),  # N > 16: shorter chunks, one step past a chunk edge
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("drop", [(), ("D", "z", "delta_bias", "initial_state")])
def test_selective_scan_triton_equals_reference(batch, dim, n, length, groups, dtype, drop):
    kw = {k: v for k, v in _scan_inputs(batch, dim, n, length, groups, dtype).items() if k not in drop}
    softplus = "delta_bias" not in drop
    if not softplus:  # Δ as given must be a time step: positive, so the state decays
        kw["delta"] = kw["delta"].abs()
    ref_y, ref_h = ops.selective_scan(**kw, delta_softplus=softplus, return_last_state=True, backend="torch")
    tri_y, tri_h = ops.selective_scan(**kw, delta_softplus=softplus, return_last_state=True, backend="triton")
    assert tri_y.dtype == ref_y.dtype == dtype and tri_h.dtype == torch.float32
    # bf16: the inputs are the same; only the output's rounding (and fp32 summation order) differ
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(tri_y.float(), ref_y.float(), **tol)
    torch.testing.assert_close(tri_h, ref_h, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "tiles",
    [
        dict(prefill="steps", steps_warps=1),  # the step-by-step kernel on one warp
        dict(prefill="steps", steps_block_d=16, steps_warps=2),  # two warps, more channels than a group
        dict(prefill="steps", steps_segments=3),  # three segments of 16 steps (the last one 13 long)
        dict(prefill="tiles"),  # the tiled kernel
        dict(prefill="lanes"),  # one thread a channel
        dict(prefill="lanes", lanes_warps=2, lanes_segments=3),  # 2 warps (past 24 channels), 3 segments
        # prefetching later steps into L2 (a GPU only: a hint that must not change a value), past the end
        dict(prefill="steps", steps_segments=3, steps_prefetch=16),
        dict(prefill="lanes", lanes_segments=3, lanes_prefetch=5),
        dict(prefill="lanes", lanes_unroll=2),  # two steps a loop turn over 29 steps (one left over)
        dict(prefill="lanes", lanes_depth=2, lanes_unroll=2, lanes_segments=3),  # loads two steps ahead
        # loads two blocks of eight steps ahead (29 steps: 4 blocks), for the test's two rows
        dict(prefill="steps", steps_depth=2, steps_depth_rows=2),
    ],
    ids=[
        "steps",
        "steps-wide",
        "steps-segments",
        "tiles",
        "lanes",
        "lanes-segments",
        "steps-pf",
        "lanes-pf",
        "lanes-unroll",
        "lanes-depth",
        "steps-depth",
    ],
)
@pytest.mark.parametrize("channels_last", [True, False])
def test_selective_scan_prefill_kernels(tiles, channels_last):
    """Every prefill kernel equals the reference at the mixer's layouts: u, Δ and z channel-contiguous views
    and B, C slices of x_proj's output (or all time-contiguous), bf16, three groups of 8 channels, a length
    off the kernel's blocks of eight steps, from an initial state."""
    from mambavl.ops.triton.scan import ScanTiles, selective_scan

    batch, dim, n, length, groups, rank = 2, 24, 16, 29, 3, 5
    gen = torch.Generator().manual_seed(0)

    def rows(*shape):  # [B, D, L] as a channel-contiguous view, or time-contiguous
        x = torch.randn(batch, length, *shape, generator=gen).to(DEVICE, torch.bfloat16)
        return x.movedim(1, -1) if channels_last else x.movedim(1, -1).contiguous()

    x_dbl = rows(groups, rank + 2 * n)  # [B, G, R + 2N, L]
    kw = dict(
        u=rows(dim), delta=(rows(dim) * 0.5), z=rows(dim), B=x_dbl[:, :, rank : rank + n],
        C=x_dbl[:, :, rank + n :], A=-torch.rand(dim, n, generator=gen).to(DEVICE) * 3,
        D=torch.randn(dim, generator=gen).to(DEVICE),
        delta_bias=torch.randn(dim, generator=gen).to(DEVICE) * 0.3,
        initial_state=torch.randn(batch, dim, n, generator=gen).to(DEVICE),
    )  # fmt: skip
    ref_y, ref_h = ops.selective_scan(**kw, delta_softplus=True, return_last_state=True, backend="torch")
    y, h = selective_scan(**kw, delta_softplus=True, return_last_state=True, tiles=ScanTiles(**tiles))
    assert y.dtype == torch.bfloat16 and y.shape == ref_y.shape
    torch.testing.assert_close(y.float(), ref_y.float(), rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(h, ref_h, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", ["steps", "lanes", "steps-ahead", "lanes-ahead"])
@pytest.mark.parametrize("segments", [1, 2, 4], ids=["whole", "2-segments", "4-segments"])
@pytest.mark.parametrize("shape", [(2, 37, 5, 45, None), (1, 16, 32, 9, None), (2, 12, 16, 17, 4)])
@pytest.mark.parametrize("softplus", [True, False])
def test_selective_scan_step_kernel_fp32(shape, softplus, segments, kernel):
    """The step-by-step and the one-thread-a-channel prefill kernels (also with their loads two blocks or
    steps ahead) in fp32 at odd sizes (37 channels, 5
    states; 32 states; groups of three channels), lengths off blocks of eight steps, from an initial state,
    Δ through softplus or as given, whole or in segments run side by side (9 steps in 4 segments leaves
    two of them empty): to 1e-4."""
    from mambavl.ops.triton.scan import ScanTiles, selective_scan

    kw = _scan_inputs(*shape, torch.float32)
    if not softplus:
        kw["delta"] = kw["delta"].abs()
    args = dict(delta_softplus=softplus, return_last_state=True)
    ref_y, ref_h = ops.selective_scan(**kw, **args, backend="torch")
    tiles = dict(prefill=kernel, steps_segments=segments, lanes_segments=segments)
    if kernel.endswith("-ahead"):  # loads two steps (blocks) ahead, segments shorter than that included
        tiles.update(prefill=kernel.split("-")[0], lanes_depth=2, steps_depth=2, steps_depth_rows=2)
    y, h = selective_scan(**kw, **args, tiles=ScanTiles(**tiles))
    torch.testing.assert_close(y, ref_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, ref_h, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("segments", [1, 3])
@pytest.mark.parametrize("shape", [(1, 128, 16, 21, 2), (2, 192, 4, 11, None)], ids=["groups", "odd-blocks"])
def test_selective_scan_lanes_pairs(shape, segments):
    """Two channels a thread (`lanes_pair`), where a program's 64 channels lie in one group of B/C (two
    groups of 64; three programs over 192 channels), whole or in segments: fp32, to 1e-4."""
    from mambavl.ops.triton.scan import ScanTiles, selective_scan

    kw = _scan_inputs(*shape, torch.float32)
    args = dict(delta_softplus=True, return_last_state=True)
    ref_y, ref_h = ops.selective_scan(**kw, **args, backend="torch")
    tiles = ScanTiles(prefill="lanes", lanes_pair=True, lanes_segments=segments)
    y, h = selective_scan(**kw, **args, tiles=tiles)
    torch.testing.assert_close(y, ref_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, ref_h, rtol=1e-4, atol=1e-4)


@triton.jit
def _softplus_kernel(x, y, n, FAST: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x + i, mask=i < n, other=0.0)
    tl.store(y + i, _timestep_fast(v, True, FAST), mask=i < n)


def test_prefill_softplus_is_accurate_everywhere():
    """The scan kernels' Δ (`_timestep_fast`: log1p(e^x) as a series where e^x < 1/16, as log2(1 + e^x)·ln 2
    above, with the approximate log2 on a GPU) equals torch's softplus to 1e-5 relative from -80 to 40
    (x·log2(e) rounds to |x|·2^-24 there), where log(1 + e^x) in fp32 loses most digits below -10 and all
    below -17; the identity above 20, and 0 at -inf (padding). Dense around the series' edge, x = ln(1/15)."""
    edge = torch.linspace(-3.2, -2.2, 501)
    x = torch.cat([torch.linspace(-80, 40, 2001), edge, torch.tensor([20.0, 20.5, -float("inf")])]).to(DEVICE)
    y = torch.empty_like(x)
    _softplus_kernel[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), FAST=x.is_cuda, BLOCK=256)
    ref = torch.nn.functional.softplus(x.double()).float()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=0.0)
    assert y[-1].item() == 0.0


def test_selective_scan_tiles_are_checked():
    from mambavl.ops.triton.scan import ScanTiles

    with pytest.raises(ValueError, match="prefill"):
        ScanTiles(prefill="rows")
    with pytest.raises(ValueError, match="steps_block_d"):
        ScanTiles(steps_block_d=12)
    with pytest.raises(ValueError, match="warp"):
        ScanTiles(steps_warps=0)
    with pytest.raises(ValueError, match="steps_segments"):
        ScanTiles(steps_segments=-1)
    with pytest.raises(ValueError, match="lanes_segments"):
        ScanTiles(lanes_segments=-1)


def test_selective_scan_triton_continues_a_sequence():
    """Two calls, the second from the first's last state, equal one call over the whole sequence."""
    kw = _scan_inputs(1, 16, 16, 40, None, torch.float32)
    kw.pop("initial_state")
    whole = ops.selective_scan(**kw, delta_softplus=True, backend="triton")
    first = {k: (v[..., :17] if k in ("u", "delta", "z", "B", "C") else v) for k, v in kw.items()}
    second = {k: (v[..., 17:] if k in ("u", "delta", "z", "B", "C") else v) for k, v in kw.items()}
    y1, h1 = ops.selective_scan(**first, delta_softplus=True, return_last_state=True, backend="triton")
    y2 = ops.selective_scan(**second, delta_softplus=True, initial_state=h1, backend="triton")
    torch.testing.assert_close(torch.cat([y1, y2], -1), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width,length", [(4, 1), (4, 70), (2, 5), (3, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,activation,initial", [(True, "silu", True), (False, None, False)])
def test_causal_conv1d_fn_triton_equals_reference(width, length, dtype, bias, activation, initial):
    dim = 37
    x = torch.randn(2, dim, length, device=DEVICE).to(dtype)
    if length > 1:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)  # channel-contiguous, as the mixers produce it
    weight = torch.randn(dim, width, device=DEVICE)
    b = torch.randn(dim, device=DEVICE) if bias else None
    init = torch.randn(2, dim, width - 1, device=DEVICE) if initial else None
    ref = ops.causal_conv1d_fn(x, weight, b, init, activation=activation, backend="torch")
    tri = ops.causal_conv1d_fn(x, weight, b, init, activation=activation, backend="triton")
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    assert tri.dtype == ref.dtype == dtype
    torch.testing.assert_close(tri.float(), ref.float(), **tol)


def test_lanes_scan_launch_rule(monkeypatch):
    """The one-thread-a-channel prefill runs whole on the CPU or when asked; on a GPU it splits a sequence
    until the launch fills the multiprocessors, but never into segments shorter than the minimum."""
    from types import SimpleNamespace

    from mambavl.ops.triton.scan import ScanTiles, lanes_launch

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert lanes_launch(ScanTiles(), 1, 5120, 16384, cpu) == 1
    assert lanes_launch(ScanTiles(lanes_segments=5), 1, 5120, 10, cpu) == 5
    props = SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert lanes_launch(ScanTiles(), 1, 5120, 16384, gpu) == 7  # 160 warps → 8 · 132 wanted
    assert lanes_launch(ScanTiles(), 1, 5120, 1000, gpu) == 3  # segments of at least 256 steps
    assert lanes_launch(ScanTiles(), 64, 5120, 16384, gpu) == 1  # a batch fills the GPU alone


def test_prefill_kernel_rule(monkeypatch):
    """ "auto" takes the lanes kernel on a GPU where a batch's rows alone give 12 warps a multiprocessor (a
    warp per 32 channels), else the step-by-step kernel; a named kernel is taken as named."""
    from types import SimpleNamespace

    from mambavl.ops.triton.scan import ScanTiles, prefill_kernel

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert ScanTiles().prefill == "auto"
    assert prefill_kernel(ScanTiles(), 64, 5120, cpu) == "steps"
    assert prefill_kernel(ScanTiles(prefill="lanes"), 1, 5120, cpu) == "lanes"
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132)
    )
    assert prefill_kernel(ScanTiles(), 16, 5120, gpu) == "lanes"  # 2,560 warps ≥ 12 · 132
    assert prefill_kernel(ScanTiles(), 8, 5120, gpu) == "steps"  # 1,280 warps
    assert prefill_kernel(ScanTiles(), 1, 5120, gpu) == "steps"  # one long sequence: segments of "steps"
    assert prefill_kernel(ScanTiles(prefill="tiles"), 64, 5120, gpu) == "tiles"


def test_step_scan_launch_rule():
    """Segments are asked for explicitly, or chosen for long single sequences on a GPU only; a program's
    channels stay inside one group of B/C; loads run two blocks ahead in batches up to `steps_depth_rows`."""
    from mambavl.ops.triton.scan import ScanTiles, steps_depth_for, steps_launch

    cpu = torch.device("cpu")
    assert steps_launch(ScanTiles(), 1, 5120, 5120, 16384, cpu) == (8, 1)
    assert steps_launch(ScanTiles(steps_segments=4), 1, 5120, 5120, 100, cpu) == (8, 4)
    assert steps_launch(ScanTiles(steps_segments=2), 2, 24, 4, 100, cpu) == (4, 2)  # groups of 4 channels
    # loads two blocks ahead for one sequence (what was measured), one block ahead for larger batches
    assert [steps_depth_for(ScanTiles(), rows) for rows in (1, 2, 8)] == [2, 1, 1]
    assert [steps_depth_for(ScanTiles(steps_depth_rows=8), rows) for rows in (1, 8, 9)] == [2, 2, 1]
    assert steps_depth_for(ScanTiles(steps_depth=1), 1) == 1
    with pytest.raises(ValueError, match="steps_depth_rows"):
        ScanTiles(steps_depth_rows=0)
