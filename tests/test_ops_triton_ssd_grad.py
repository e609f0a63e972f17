"""The Triton SSD chunked scan's backward against autograd through the PyTorch reference: the gradients of
every input (and through the final state), on the GPU when there is one, else in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest), on small shapes with odd sizes and partial chunks."""

from __future__ import annotations

import pytest
import torch

import test_ops_triton_ssd
from mambavl import ops

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
# Tolerances relative to the largest entry of each reference gradient (gradients span orders of magnitude).
FP32 = dict(rtol=1e-4, atol=1e-4)
BF16 = dict(rtol=3e-2, atol=3e-2)


def _inputs(batch=1, length=21, heads=4, p=6, groups=2, n=16, dtype=torch.float32):
    """test_ops_triton_ssd's inputs, with this file's defaults (three chunks of 8, the last partial)."""
    return test_ops_triton_ssd._inputs(batch, length, heads, p, groups, n, dtype)


def _grads(inputs, chunk, backend, gy, gfinal, **options):
    """(y, final, {name: gradient}) of <y, gy> + <final, gfinal>; gy or gfinal None leaves that term out."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    y, final = ops.mamba_chunk_scan_combined(
        **{k: leaves.get(k) for k in NAMES},
        chunk_size=chunk,
        return_final_states=True,
        backend=backend,
        **options,
    )
    loss = 0
    if gy is not None:
        loss = loss + (y.float() * gy).sum()
    if gfinal is not None:
        loss = loss + (final * gfinal).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)  # only final: C, D, z unused
    grads = [torch.zeros_like(v) if g is None else g for v, g in zip(leaves.values(), grads, strict=True)]
    return y, final, dict(zip(leaves, grads, strict=True))


def _compare(inputs, chunk, tol=FP32, y_grad=True, final_grad=True, **options):
    batch, length, heads, p = inputs["x"].shape
    gy = torch.randn(batch, length, heads, p, device=DEVICE) if y_grad else None
    gfinal = torch.randn(batch, heads, p, inputs["B"].shape[-1], device=DEVICE) if final_grad else None
    y_ref, final_ref, ref = _grads(inputs, chunk, "torch", gy, gfinal, **options)
    y_tri, final_tri, tri = _grads(inputs, chunk, "triton", gy, gfinal, **options)
    scale = max(y_ref.float().abs().max().item(), 1.0)
    y_tri, y_ref, final_tri, final_ref = (t.detach() for t in (y_tri, y_ref, final_tri, final_ref))
    torch.testing.assert_close(y_tri.float(), y_ref.float(), rtol=tol["rtol"], atol=tol["atol"] * scale)
    scale = final_ref.abs().max().item()
    torch.testing.assert_close(final_tri, final_ref, rtol=tol["rtol"], atol=tol["atol"] * scale)
    assert ref.keys() == tri.keys()
    for name in ref:
        want, got = ref[name], tri[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        _close(name, got, want, **tol)


def _close(name, got, want, rtol, atol):
    """Elementwise, with atol relative to the reference's largest entry; the message names the input."""
    scale = max(want.float().abs().max().item(), 1e-6)
    torch.testing.assert_close(
        got.float(), want.float(), rtol=rtol, atol=atol * scale, msg=lambda m: f"gradient of {name}: {m}"
    )


@pytest.mark.parametrize("groups", [1, 2])
def test_ssd_grad_every_input(groups):
    # 3 chunks, the last partial; D per channel, the gate, bias, softplus, limits, initial and final states
    _compare(_inputs(groups=groups), 8, dt_softplus=True, dt_limit=(0.05, 1.5))


def test_ssd_grad_shorter_than_a_chunk():
    inputs = _inputs(length=5, groups=1)
    inputs["D"] = inputs["D"][:, 0].contiguous()  # D per head
    _compare(inputs, 16, dt_softplus=True)


@pytest.mark.parametrize(
    "drop,options,terms",
    [
        # Δ as given (kept positive), nothing optional: the bare scan
        (("D", "z", "dt_bias", "initial_states"), dict(), "both"),
        # D per head, no gate; only y's gradient (none flows into the final state)
        (("z",), dict(dt_softplus=True), "y"),
        # only the final state's gradient; a lower limit of 0 and no initial state
        (("initial_states",), dict(dt_softplus=True, dt_limit=(0.0, 0.5)), "final"),
    ],
)
def test_ssd_grad_options(drop, options, terms):
    inputs = _inputs(length=19, heads=2, groups=1)
    if not options.get("dt_softplus"):
        inputs["dt"] = torch.rand_like(inputs["dt"]) + 0.05
    if "z" in drop:
        inputs["D"] = inputs["D"][:, 0].contiguous()
    for name in drop:
        inputs[name] = None
    _compare(inputs, 8, y_grad=terms != "final", final_grad=terms != "y", **options)


def test_ssd_grad_bf16():
    _compare(_inputs(dtype=torch.bfloat16), 8, BF16, dt_softplus=True, dt_limit=(0.0, 2.0))


@pytest.mark.parametrize("chunk", [32, 24])
def test_ssd_grad_several_tiles(monkeypatch, chunk):
    """The backward with several position tiles in a chunk (24: the last tile runs past the chunk), channel
    and state tiles, and a group's heads split over programs (every piece summed across programs); the
    forward keeps its own tiles."""
    import mambavl.ops.triton.ssd as kernels

    for knob in ("positions_bwd", "channels_bwd", "state_bwd"):
        monkeypatch.setitem(kernels.TILES, knob, 16)
    monkeypatch.setitem(kernels.TILES, "heads_bwd", 1)
    inputs = _inputs(length=40, heads=2, p=20, groups=1, n=18)
    _compare(inputs, chunk, dt_softplus=True)


def test_ssd_grad_strided_views():
    # the layout of the models: x, B and C split off one projection, dt a slice of a wider tensor
    batch, length, heads, p, groups, n = 1, 13, 2, 6, 1, 16
    xBC = torch.randn(batch, length, heads * p + 2 * groups * n, device=DEVICE)
    x, B, C = xBC.split([heads * p, groups * n, groups * n], dim=-1)
    inputs = _inputs(batch, length, heads, p, groups, n)
    inputs |= dict(
        x=x.view(batch, length, heads, p),
        B=B.reshape(batch, length, groups, n),
        C=C.reshape(batch, length, groups, n),
        dt=torch.randn(batch, length, 2 * heads, device=DEVICE)[..., 1::2],
        z=torch.randn(batch, length, heads, 2 * p, device=DEVICE)[..., :p],
    )
    assert not inputs["x"].is_contiguous() and not inputs["dt"].is_contiguous()
    _compare(inputs, 8, dt_softplus=True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_grad_full_size_tiles(dtype):
    # Mamba-2 2.7B's chunk and tiles (chunk 256 in 64-position tiles, P = 64, N = 128), two chunks, slow decay
    inputs = _inputs(batch=1, length=300, heads=2, p=64, groups=1, n=128, dtype=dtype)
    inputs["A"] = -torch.rand(2, device=DEVICE) * 0.2 - 0.01
    _compare(inputs, 256, FP32 if dtype == torch.float32 else BF16, dt_softplus=True)


@pytest.mark.slow
@pytest.mark.parametrize("groups", [1, 3])
def test_ssd_grad_larger(groups):
    _compare(_inputs(batch=2, length=70, heads=6, p=10, groups=groups, n=16), 16, dt_softplus=True)


def _mixer_outputs(cfg, backend, monkeypatch, hidden):
    from mambavl.lm.mamba2 import Mamba2Mixer

    torch.manual_seed(1)
    mixer = Mamba2Mixer(cfg).to(DEVICE)
    with torch.no_grad():
        for param in mixer.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    monkeypatch.setenv("MAMBAVL_BACKEND", backend)
    out = mixer(hidden)
    names, params = zip(*mixer.named_parameters(), strict=True)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1], device=DEVICE)).sum(), params)
    return out, dict(zip(names, grads, strict=True))


@pytest.mark.parametrize("gated_norm,d_has_hdim", [(True, False), (False, True)])
def test_mamba2_mixer_trains_the_same_under_triton(monkeypatch, gated_norm, d_has_hdim):
    """A whole Mamba-2 mixer (conv, SSD, gated norm or gate in the scan) under MAMBAVL_BACKEND=triton equals
    the reference: outputs and every parameter's gradient."""
    from mambavl.lm.config import LMConfig

    cfg = LMConfig(
        family="mamba2",
        d_model=12,
        n_layer=1,
        vocab_size=8,
        default_mixer="mamba2",
        headdim=6,
        d_state=16,
        ngroups=2,
        chunk_size=8,
        dt_limit=(0.001, 2.0),
        gated_norm=gated_norm,
        d_has_hdim=d_has_hdim,
    )
    hidden = torch.randn(2, 19, 12, device=DEVICE)
    out_ref, grads_ref = _mixer_outputs(cfg, "torch", monkeypatch, hidden)
    out_tri, grads_tri = _mixer_outputs(cfg, "triton", monkeypatch, hidden)
    torch.testing.assert_close(out_tri, out_ref, rtol=1e-4, atol=1e-5)
    for name, want in grads_ref.items():
        _close(name, grads_tri[name], want, **FP32)


@pytest.mark.parametrize("case", ["falcon_h1-rmsnorm-tied", "zamba2-one-block-gqa-bias"])
def test_hybrid_lm_trains_the_same_under_triton(monkeypatch, tmp_path, case):
    """A tiny Falcon-H1 LM (Mamba-2 with its gated norm beside attention in every layer, µP multipliers)
    and a tiny Zamba2 LM (a shared attention + MLP block feeding Mamba-2, used twice) under
    MAMBAVL_BACKEND=triton equal the reference: the loss and every parameter's gradient (the shared
    block's summed over its uses)."""
    import refmodels
    from mambavl.lm import load_lm

    path = refmodels.save(refmodels.make(case), tmp_path / "lm")
    ids = torch.randint(0, 90, (2, 21), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MAMBAVL_BACKEND", backend)
        lm = load_lm(path, dtype=torch.float32, device=DEVICE).train()
        logits = lm(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        names, params = zip(*lm.named_parameters(), strict=True)
        results[backend] = loss, dict(zip(names, torch.autograd.grad(loss, params), strict=True))
    (loss_ref, grads_ref), (loss_tri, grads_tri) = results["torch"], results["triton"]
    torch.testing.assert_close(loss_tri, loss_ref, rtol=1e-5, atol=1e-6)
    for name, want in grads_ref.items():
        _close(name, grads_tri[name], want, **FP32)
