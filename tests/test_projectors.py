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


@pytest.mark.parametrize("name", sorted(PROJECTORS))
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
