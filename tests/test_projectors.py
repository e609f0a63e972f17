"""Projectors: the seeds' parameter names and shapes (so checkpoints load), their sizes at full scale,
and what each computes."""

import pytest
import torch
import torch.nn.functional as F

from mambavl.projectors import PROJECTORS, create_projector

KEYS = {
    "linear": {"projector.weight": (16, 12), "projector.bias": (16,)},
    "gelu-mlp": {"projector.0.weight": (16, 12), "projector.2.weight": (16, 16)},
    "fused-gelu-mlp": {
        "projector.0.weight": (48, 12),
        "projector.2.weight": (16, 48),
        "projector.4.weight": (16, 16),
    },
    "fused-ldpnet": {
        "projector.0.weight": (48, 12),
        "projector.2.weight": (16, 48),
        "projector.4.peg.0.weight": (16, 1, 3, 3),
    },
}


def test_every_projector_is_covered():
    # these have their own tests (rmsnorm-relu2-mlp against transformers': test_nemotron_vlm)
    assert set(PROJECTORS) == set(KEYS) | {"msc", "vss-l2", "rmsnorm-relu2-mlp"}


@pytest.mark.parametrize("name", sorted(KEYS))
def test_parameter_names_and_shapes(name):
    sd = create_projector(name, 12, 16).state_dict()
    for key, shape in KEYS[name].items():
        assert tuple(sd[key].shape) == shape
    assert all(k.startswith("projector.") for k in sd)


@pytest.mark.parametrize(
    "name,params",
    [("fused-gelu-mlp", 47.8e6), ("gelu-mlp", 12.1e6), ("linear", 5.57e6), ("fused-ldpnet", 41.3e6)],
)
def test_full_size_parameter_counts(name, params):
    with torch.device("meta"):
        n = sum(p.numel() for p in create_projector(name, 2176, 2560).parameters())
    assert abs(n - params) / params < 0.01, n


@torch.no_grad()
def test_rmsnorm_relu2_mlp_computes_what_it_says():
    p = create_projector("rmsnorm-relu2-mlp", 12, 16, hidden=20)
    assert {k: tuple(v.shape) for k, v in p.state_dict().items()} == {
        "layer_norm.weight": (12,), "linear_1.weight": (20, 12), "linear_2.weight": (16, 20),
    }  # fmt: skip
    p.layer_norm.weight.normal_()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    p = p.double()
    normed = x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * p.layer_norm.weight
    torch.testing.assert_close(p(x), p.linear_2(F.relu(p.linear_1(normed)) ** 2))


@torch.no_grad()
def test_fused_mlp_computes_what_it_says():
    p = create_projector("fused-gelu-mlp", 12, 16)
    x = torch.randn(2, 9, 12)
    s = p.projector
    want = s[4](F.gelu(s[2](F.gelu(s[0](x)))))
    torch.testing.assert_close(p(x), want)


@torch.no_grad()
def test_ldp_pools_the_grid_and_adds_the_positional_residual():
    p = create_projector("fused-ldpnet", 12, 16)
    x = torch.randn(2, 27 * 27, 12)
    out = p(x)
    assert out.shape == (2, 14 * 14, 16)
    h = p.projector[2](F.gelu(p.projector[0](x)))  # [2, 729, 16], row-major 27×27
    grid = F.adaptive_avg_pool2d(h.transpose(1, 2).reshape(2, 16, 27, 27), (14, 14))
    conv = p.projector[4].peg[0]
    want = (F.conv2d(grid, conv.weight, conv.bias, padding=1, groups=16) + grid).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="square patch grid"):
        p(torch.randn(1, 10, 12))


def test_unknown_projector():
    with pytest.raises(KeyError, match="unknown projector 'mlp3'"):
        create_projector("mlp3", 4, 4)


# --- ML-Mamba's Mamba-2 Scan Connector --------------------------------------------------------------------

TINY_MSC = dict(d_state=8, headdim=8, chunk_size=8)


def test_msc_keys_and_shapes_match_the_release():
    with torch.device("meta"):
        msc = create_projector("msc", 2176, 2560)
    sd = msc.state_dict()
    bi = {
        k.removeprefix("bidirectional_mamba."): v.shape
        for k, v in sd.items()
        if k.startswith("bidirectional_mamba.")
    }
    assert sum(v.numel() for k, v in sd.items() if k.startswith("bidirectional_mamba.")) == 119_834_560
    expected = {
        "layers.0.norm.weight": (2560,),
        "layers.0.mixer.in_proj.weight": (10576, 2560),
        "layers.0.mixer.conv1d.weight": (5376, 1, 4),
        "layers.0.mixer.conv1d_b.bias": (5376,),
        "layers.0.mixer.dt_bias_b": (80,),
        "layers.0.mixer.A_log_b": (80,),
        "layers.0.mixer.D_b": (80,),
        "layers.0.mixer.norm.weight": (5120,),
        "layers.0.mixer.out_proj.weight": (2560, 5120),
        "layers.1.mlp.w3.bias": (2560,),
        "norm_f.bias": (2560,),
    }
    for key, shape in expected.items():
        assert tuple(bi[key]) == shape, key
    assert len(bi) == 2 * 21 + 2
    assert tuple(sd["mlp.0.weight"].shape) == (2560, 2176)
    assert tuple(sd["projector.projector.0.weight"].shape) == (10240, 2560)


@torch.no_grad()
def test_bidirectional_mixer_is_the_mean_of_two_mamba2_scans():
    """fwd(x) and flip(bwd(flip(x))) through our single-direction Mamba-2 mixer (itself equal to
    transformers'), sharing in_proj, the gated norm and out_proj (no bias, so averaging commutes)."""
    import copy

    from mambavl.lm.mamba2 import Mamba2Mixer
    from mambavl.projectors.msc import BiMamba2Mixer, connector_config

    cfg = connector_config(32, **TINY_MSC)
    bi = BiMamba2Mixer(cfg)
    for p in bi.parameters():
        p.add_(torch.randn_like(p) * 0.1)
    fwd = Mamba2Mixer(cfg)
    fwd.load_state_dict({k: v for k, v in bi.state_dict().items() if not k.endswith("_b") and "_b." not in k})
    bwd = copy.deepcopy(fwd)
    for name in ("dt_bias", "A_log", "D"):
        getattr(bwd, name).copy_(getattr(bi, name + "_b"))
    bwd.conv1d.load_state_dict(bi.conv1d_b.state_dict())
    x = torch.randn(2, 19, 32)
    want = (fwd(x) + bwd(x.flip(1)).flip(1)) / 2
    torch.testing.assert_close(bi(x), want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_msc_is_time_reversal_symmetric_when_both_directions_agree():
    msc = create_projector("msc", 12, 32, **TINY_MSC)
    for layer in msc.bidirectional_mamba.layers:
        m = layer.mixer
        m.conv1d_b.load_state_dict(m.conv1d.state_dict())
        for name in ("dt_bias", "A_log", "D"):
            getattr(m, name + "_b").copy_(getattr(m, name))
    x = torch.randn(1, 16, 12)
    # every part is token-wise except the mixers, which are now symmetric under reversing time
    torch.testing.assert_close(msc(x.flip(1)), msc(x).flip(1), atol=1e-5, rtol=1e-5)
    assert msc(x).shape == (1, 16, 32)


@torch.no_grad()
def test_four_direction_cross_scan_is_the_mean_of_four_mamba2_scans():
    """Row-major, reversed, column-major, reversed column-major: each through our (transformers-verified)
    single-direction mixer with that direction's parameters, mapped back to row-major positions."""
    import copy

    from mambavl.lm.mamba2 import Mamba2Mixer
    from mambavl.projectors.msc import SUFFIXES, BiMamba2Mixer, connector_config

    cfg = connector_config(32, **TINY_MSC)
    mixer = BiMamba2Mixer(cfg, directions=4)
    for p in mixer.parameters():
        p.add_(torch.randn_like(p) * 0.1)
    side = 4
    x = torch.randn(2, side * side, 32)
    cols = torch.arange(side * side).view(side, side).t().flatten()
    orders = [torch.arange(side * side), torch.arange(side * side).flip(0), cols, cols.flip(0)]
    want = 0
    for suffix, order in zip(SUFFIXES, orders, strict=True):
        single = Mamba2Mixer(cfg)
        single.load_state_dict({k: v for k, v in mixer.state_dict().items() if k in single.state_dict()})
        for name in ("dt_bias", "A_log", "D"):
            getattr(single, name).copy_(getattr(mixer, name + suffix))
        single.conv1d = copy.deepcopy(getattr(mixer, "conv1d" + suffix))
        y = single(x[:, order])
        want = want + torch.empty_like(y).index_copy_(1, order, y)
    torch.testing.assert_close(mixer(x), want / 4, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_four_direction_msc_is_transpose_equivariant_when_directions_agree():
    msc = create_projector("msc", 12, 32, directions=4, **TINY_MSC)
    for layer in msc.bidirectional_mamba.layers:
        m = layer.mixer
        for suffix in ("_b", "_c", "_d"):
            getattr(m, "conv1d" + suffix).load_state_dict(m.conv1d.state_dict())
            for name in ("dt_bias", "A_log", "D"):
                getattr(m, name + suffix).copy_(getattr(m, name))
    grid = torch.randn(1, 4, 4, 12)
    transposed = grid.transpose(1, 2)
    out = msc(grid.flatten(1, 2)).view(1, 4, 4, 32)
    out_t = msc(transposed.flatten(1, 2)).view(1, 4, 4, 32)
    torch.testing.assert_close(out_t, out.transpose(1, 2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="square patch grid"):
        msc(torch.randn(1, 10, 12))


# --- VL-Mamba's VSS connector (SS2D cross-scan) -------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("directions", [2, 4])
def test_ss2d_equals_independent_scans_per_direction(directions):
    """Each direction: its own scan order over a 3×4 grid, its own x_proj / dt_proj / A / D, the textbook
    recurrence (test_ops), mapped back to row-major and summed; then LayerNorm, the silu(z) gate, out_proj."""
    from mambavl.projectors.vss import SS2D
    from test_ops import loop_selective_scan

    ss = SS2D(16, d_state=4, directions=directions)
    for p in ss.parameters():
        p.add_(torch.randn_like(p) * 0.1)
    h, w, b = 3, 4, 2
    grid = torch.randn(b, h, w, 16)
    x, z = ss.in_proj(grid).chunk(2, dim=-1)
    x = F.silu(ss.conv2d(x.permute(0, 3, 1, 2))).reshape(b, ss.d_inner, h * w)  # row-major
    cols = torch.arange(h * w).view(h, w).t().flatten()
    orders = [torch.arange(h * w), torch.arange(h * w).flip(0), cols, cols.flip(0)]
    orders = orders[:2] if directions == 2 else [orders[0], orders[2], orders[1], orders[3]]
    total = 0
    d = ss.d_inner
    for k, order in enumerate(orders):
        xs = x[:, :, order]
        dbl = torch.einsum("bdl,cd->bcl", xs, ss.x_proj_weight[k])
        dt, B, C = dbl.split([ss.rank, ss.d_state, ss.d_state], dim=1)
        dt = torch.einsum("brl,dr->bdl", dt, ss.dt_projs_weight[k])
        A = -torch.exp(ss.A_logs[k * d : (k + 1) * d])
        y, _ = loop_selective_scan(
            xs, dt, A, B, C, ss.Ds[k * d : (k + 1) * d], None, ss.dt_projs_bias[k], softplus=True
        )
        total = total + torch.empty_like(y).index_copy_(2, order, y)
    y = total.transpose(1, 2).reshape(b, h, w, d)
    want = ss.out_proj(ss.out_norm(y) * F.silu(z))
    torch.testing.assert_close(ss(grid), want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_vss_connector_is_transpose_equivariant_when_directions_agree():
    p = create_projector("vss-l2", 12, 32, d_state=4)
    ss = p.vss
    for name in ("x_proj_weight", "dt_projs_weight", "dt_projs_bias"):
        getattr(ss, name).copy_(getattr(ss, name)[:1].expand_as(getattr(ss, name)))
    d = ss.d_inner
    ss.A_logs.copy_(ss.A_logs[:d].repeat(4, 1))
    ss.Ds.copy_(ss.Ds[:d].repeat(4))
    ss.conv2d.weight.copy_((ss.conv2d.weight + ss.conv2d.weight.transpose(2, 3)) / 2)  # a symmetric kernel
    grid = torch.randn(1, 4, 4, 12)
    out = p(grid.flatten(1, 2)).view(1, 4, 4, 32)
    out_t = p(grid.transpose(1, 2).flatten(1, 2)).view(1, 4, 4, 32)
    torch.testing.assert_close(out_t, out.transpose(1, 2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="square patch grid"):
        p(torch.randn(1, 10, 12))
    with pytest.raises(ValueError, match="directions must be 2"):
        create_projector("vss-l2", 12, 32, directions=3)
