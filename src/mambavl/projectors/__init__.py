"""Projectors from vision features to the LM's embedding width, by the seeds' names."""

from __future__ import annotations

from torch import nn

from mambavl.projectors.ldp import FusedLDPProjector
from mambavl.projectors.mlp import FusedMLPProjector, LinearProjector, MLPProjector

PROJECTORS: dict[str, type[nn.Module]] = {
    "linear": LinearProjector,
    "gelu-mlp": MLPProjector,
    "fused-gelu-mlp": FusedMLPProjector,
    "fused-ldpnet": FusedLDPProjector,
}


def create_projector(name: str, vision_dim: int, llm_dim: int) -> nn.Module:
    if name not in PROJECTORS:
        raise KeyError(f"unknown projector {name!r}; known: {sorted(PROJECTORS)}")
    return PROJECTORS[name](vision_dim, llm_dim)


__all__ = [
    "PROJECTORS",
    "FusedLDPProjector",
    "FusedMLPProjector",
    "LinearProjector",
    "MLPProjector",
    "create_projector",
]
