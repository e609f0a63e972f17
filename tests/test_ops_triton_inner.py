"""`ops.mamba1_inner` (conv → x_proj → dt_proj → scan in one autograd node under Triton) against the composed
reference ops: the output and every input's gradient, in fp32 and under bf16 autocast, on the GPU when there
is one, else in Triton's interpreter; and what the node keeps for its backward."""

from __future__ import annotations

import pytest
import torch

from mambavl import ops

pytest.importorskip("triton")
from mambavl.ops.triton import inner

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("x", "z", "conv_weight", "conv_bias", "x_proj_weight", "dt_proj_weight", "dt_bias", "A", "D")


def _inputs(batch=2, dim=12, length=37, n=4, rank=3, width=4, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE).requires_grad_()

    xz = torch.randn(batch, length, 2 * dim, generator=g).to(DEVICE)
    x, z = (half.transpose(1, 2).detach().requires_grad_() for half in xz.chunk(2, dim=-1))
    return dict(
        x=x,
        z=z,
        conv_weight=r(dim, width, scale=0.5),
        conv_bias=r(dim, scale=0.1),
        x_proj_weight=r(rank + 2 * n, dim, scale=0.3),
        dt_proj_weight=r(dim, rank, scale=0.3),
        dt_bias=r(dim, scale=0.3),
        A=(-torch.rand(dim, n, generator=g) * 3).to(DEVICE).requires_grad_(),
        D=r(dim),
    ), (rank, n)


def _run(backend, inputs, sizes, gout, autocast=False):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        y = ops.mamba1_inner(**leaves, dt_rank=sizes[0], d_state=sizes[1], backend=backend)
    (y.float() * gout).sum().backward()
    return y.float().detach(), {k: leaves[k].grad for k in NAMES}


@pytest.mark.parametrize("length", [5, 37])
def test_fused_inner_equals_the_composed_ops(length):
    inputs, sizes = _inputs(length=length)
    gout = torch.randn(2, 12, length, device=DEVICE)
    y_ref, g_ref = _run("torch", inputs, sizes, gout)
    y_tri, g_tri = _run("triton", inputs, sizes, gout)
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-4, atol=1e-4)
    for name in NAMES:
        scale = g_ref[name].abs().max().item()
        assert g_tri[name] is not None, name
        torch.testing.assert_close(g_tri[name], g_ref[name], rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_fused_inner_under_bf16_autocast_matches_the_composed_ops():
    """Under autocast the projections run in bf16 in both; the two agree within bf16 rounding."""
    inputs, sizes = _inputs(length=21, seed=1)
    gout = torch.randn(2, 12, 21, device=DEVICE)
    y_ref, g_ref = _run("triton", inputs, sizes, gout, autocast=False)
    y_tri, g_tri = _run("triton", inputs, sizes, gout, autocast=True)
    torch.testing.assert_close(y_tri, y_ref, rtol=3e-2, atol=3e-2)
    for name in NAMES:
        scale = g_ref[name].abs().max().item()
        torch.testing.assert_close(g_tri[name].float(), g_ref[name], rtol=5e-2, atol=5e-2 * scale, msg=name)


def test_the_node_keeps_no_conv_output_and_no_delta():
    """What lives from forward to backward: x and z (in_proj's output, kept for in_proj anyway), the
    parameters, x_proj's [B, L, R + 2N] output and the chunk states; no other [B, D, L] tensor."""
    inputs, sizes = _inputs(length=37)
    y = inner.mamba1_inner(**inputs, dt_rank=sizes[0], d_state=sizes[1])
    saved = y.grad_fn.saved_tensors
    full = [t for t in saved if t is not None and t.dim() == 3 and tuple(t.shape) == (2, 12, 37)]
    assert len(full) == 2
    assert {t.data_ptr() for t in full} == {inputs["x"].data_ptr(), inputs["z"].data_ptr()}


# ---- the whole mixer (in_proj and out_proj taken in) -------------------------------------------------------
MIXER_NAMES = ("hidden", "in_proj_weight", "in_proj_bias", *NAMES[2:], "out_proj_weight", "out_proj_bias")


def _mixer_inputs(batch=2, dim=12, length=37, width=10, n=4, rank=3, bias=False, seed=0):
    inputs, sizes = _inputs(batch, dim, length, n, rank, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE).requires_grad_()

    del inputs["x"], inputs["z"]
    return dict(
        hidden=r(batch, length, width),
        in_proj_weight=r(2 * dim, width, scale=0.4),
        in_proj_bias=r(2 * dim, scale=0.1) if bias else None,
        **inputs,
        out_proj_weight=r(width, dim, scale=0.4),
        out_proj_bias=r(width, scale=0.1) if bias else None,
    ), sizes


def _run_mixer(backend, inputs, sizes, gout, autocast=False):
    leaves = {k: v.detach().clone().requires_grad_() if v is not None else None for k, v in inputs.items()}
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        out = ops.mamba1_mixer(**leaves, dt_rank=sizes[0], d_state=sizes[1], backend=backend)
    (out.float() * gout).sum().backward()
    return out.float().detach(), {k: leaves[k].grad for k in MIXER_NAMES if leaves[k] is not None}


@pytest.mark.parametrize(("length", "bias"), [(5, False), (32, True), (37, False)])
def test_fused_mixer_equals_the_composed_ops(length, bias):
    """Lengths off and on the 16-step padding; with and without projection biases."""
    inputs, sizes = _mixer_inputs(length=length, bias=bias)
    gout = torch.randn(2, length, 10, device=DEVICE)
    y_ref, g_ref = _run_mixer("torch", inputs, sizes, gout)
    y_tri, g_tri = _run_mixer("triton", inputs, sizes, gout)
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-4, atol=1e-4)
    assert g_tri.keys() == g_ref.keys()
    for name, ref in g_ref.items():
        assert g_tri[name].dtype == ref.dtype, name
        torch.testing.assert_close(g_tri[name], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(), msg=name)


def test_fused_mixer_under_bf16_autocast_matches_the_reference():
    """Under autocast both run the projections in bf16: outputs and gradients agree within its rounding,
    and the gradients come back in the parameters' dtype."""
    inputs, sizes = _mixer_inputs(length=21, seed=2)
    gout = torch.randn(2, 21, 10, device=DEVICE)
    y_ref, g_ref = _run_mixer("torch", inputs, sizes, gout, autocast=True)
    y_tri, g_tri = _run_mixer("triton", inputs, sizes, gout, autocast=True)
    torch.testing.assert_close(y_tri, y_ref, rtol=3e-2, atol=3e-2)
    for name, ref in g_ref.items():
        assert g_tri[name].dtype == torch.float32, name
        torch.testing.assert_close(
            g_tri[name].float(), ref.float(), rtol=5e-2, atol=5e-2 * ref.abs().max().item(), msg=name
        )


def test_the_mixer_node_keeps_in_proj_output_and_the_scan_output_alone():
    """Of per-position tensors the mixer's node keeps h (in_proj's weight gradient), in_proj's output,
    x_proj's small output and the scan's output (out_proj's weight gradient), each over the B·L' padded
    positions: no conv output, no Δ, no gradient-side copy in another layout."""
    inputs, sizes = _mixer_inputs(length=37)
    out = inner.mamba1_mixer(*inputs.values(), sizes[0], sizes[1])
    assert out.shape == (2, 37, 10)
    positions = 2 * 48  # two rows of 37 steps, padded to 48
    kept = sorted(tuple(t.shape) for t in out.grad_fn.saved_tensors if t is not None and positions in t.shape)
    assert kept == sorted([(positions, 10), (24, positions), (positions, 3 + 2 * 4), (12, positions)])


# ---- the Mamba-2 mixer between in_proj and out_proj -------------------------------------------------------
MAMBA2_NAMES = ("zxbcdt", "conv_weight", "conv_bias", "dt_bias", "A", "D", "norm_weight", "out_proj_weight")


def _mamba2_inputs(length, per_channel_d, groups=2, heads=4, headdim=6, n=8, width=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim, gn = heads * headdim, groups * n

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(DEVICE).requires_grad_()

    inputs = dict(
        zxbcdt=r(2, length, 2 * dim + 2 * gn + heads),
        conv_weight=r(dim + 2 * gn, 4, scale=0.5),
        conv_bias=r(dim + 2 * gn, scale=0.1),
        dt_bias=r(heads, scale=0.3, shift=-1.0),
        A=(-torch.rand(heads, generator=g) * 3 - 0.1).to(DEVICE).requires_grad_(),
        D=r(dim if per_channel_d else heads),
        norm_weight=r(dim, scale=0.2, shift=1.0),
        out_proj_weight=r(width, dim, scale=0.3),
        out_proj_bias=None,
    )
    return inputs, dict(headdim=headdim, ngroups=groups, d_state=n, chunk_size=16, norm_eps=1e-5)


def _run_mamba2(backend, inputs, opts, gout, group_size, before, dt_limit, autocast=False):
    leaves = {k: v.detach().clone().requires_grad_() if v is not None else None for k, v in inputs.items()}
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        out = ops.mamba2_inner(
            **leaves, **opts, norm_group_size=group_size, norm_before_gate=before, dt_limit=dt_limit,
            backend=backend,
        )  # fmt: skip
    (out.float() * gout).sum().backward()
    return out.float().detach(), {k: leaves[k].grad for k in MAMBA2_NAMES}


@pytest.mark.parametrize(
    ("length", "per_channel_d", "group_size", "before", "dt_limit"),
    [
        (37, True, 12, False, (0.0, float("inf"))),  # off the chunk size; D per channel; two norm groups
        (32, False, 24, True, (0.01, 2.0)),  # whole chunks; D per head; the norm before the gate; Δ limits
    ],
)
def test_fused_mamba2_inner_equals_the_composed_ops(length, per_channel_d, group_size, before, dt_limit):
    inputs, opts = _mamba2_inputs(length, per_channel_d)
    gout = torch.randn(2, length, 10, device=DEVICE)
    args = (group_size, before, dt_limit)
    y_ref, g_ref = _run_mamba2("torch", inputs, opts, gout, *args)
    y_tri, g_tri = _run_mamba2("triton", inputs, opts, gout, *args)
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-4, atol=1e-4)
    for name, ref in g_ref.items():
        assert g_tri[name] is not None and g_tri[name].shape == ref.shape, name
        torch.testing.assert_close(g_tri[name], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(), msg=name)


def test_the_mamba2_node_keeps_no_conv_scan_or_norm_output():
    """Of per-position tensors the node keeps in_proj's output alone (and the norm's 1/rms per row and
    group, and the scan's per-chunk values): the conv's, the scan's and the norm's outputs are recomputed."""
    inputs, opts = _mamba2_inputs(37, True)
    out = inner.mamba2_inner(*inputs.values(), *opts.values(), 12, False, (0.0, float("inf")))
    per_position = [
        tuple(t.shape) for t in out.grad_fn.saved_tensors if t is not None and {37, 2 * 37} & set(t.shape)
    ]
    assert per_position == [(2, 37, 84), (2 * 37, 2)]  # in_proj's output; 1/rms per row and norm group


def test_fused_mamba2_inner_under_bf16_autocast_matches_the_reference():
    """Under autocast both run out_proj in bf16 and take in_proj's bf16 output: outputs and gradients agree
    within its rounding, and the parameters' gradients come back in their dtype."""
    inputs, opts = _mamba2_inputs(21, True, seed=3)
    gout = torch.randn(2, 21, 10, device=DEVICE)
    args = (12, False, (0.0, float("inf")))
    y_ref, g_ref = _run_mamba2("torch", inputs, opts, gout, *args, autocast=True)
    y_tri, g_tri = _run_mamba2("triton", inputs, opts, gout, *args, autocast=True)
    torch.testing.assert_close(y_tri, y_ref, rtol=5e-2, atol=5e-2)
    for name, ref in g_ref.items():
        assert g_tri[name].dtype == ref.dtype, name
        torch.testing.assert_close(
            g_tri[name].float(), ref.float(), rtol=5e-2, atol=5e-2 * ref.abs().max().item(), msg=name
        )


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_mixers_call_projections_that_carry_hooks_or_adapters(kind, monkeypatch):
    """The fused training paths read the projections' weights directly; a projection with a hook (or
    wrapped by an adapter, as LoRA does) must be called instead: the mixer then takes the composed path,
    and its output still equals the fused one's."""
    import dataclasses

    from mambavl.lm.mamba1 import Mamba1Mixer
    from mambavl.lm.mamba2 import Mamba2Mixer
    from mambavl.presets import TINY_MAMBA, TINY_MAMBA2

    monkeypatch.setenv("MAMBAVL_BACKEND", "triton")
    base = TINY_MAMBA if kind == "mamba1" else TINY_MAMBA2
    small = dict(d_model=16, d_inner=32, dt_rank=2) if kind == "mamba1" else {}
    cfg = dataclasses.replace(base, n_layer=1, mixers=base.mixers[:1], ffns=base.ffns[:1], **small)
    torch.manual_seed(0)
    mixer = (Mamba1Mixer if kind == "mamba1" else Mamba2Mixer)(cfg).to(DEVICE)
    hidden = torch.randn(1, 9, cfg.d_model, device=DEVICE, requires_grad=True)
    fused = mixer(hidden)
    calls = []
    mixer.out_proj.register_forward_hook(lambda *_: calls.append(1))
    composed = mixer(hidden)
    assert calls, "out_proj carries a hook: it must be called"
    torch.testing.assert_close(composed, fused, rtol=1e-4, atol=1e-5)
