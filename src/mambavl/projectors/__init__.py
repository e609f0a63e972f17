"""Projectors from vision features to the LM's embedding width, by the seeds' names."""

from __future__ import annotations

from torch import nn

from mambavl.projectors.ldp import FusedLDPProjector
from mambavl.projectors.mlp import FusedMLPProjector, LinearProjector, MLPProjector, RMSReLU2Projector
from mambavl.projectors.msc import MSCProjector
from mambavl.projectors.vss import VSSProjector

PROJECTORS: dict[str, type[nn.Module]] = {
    "linear": LinearProjector,
    "gelu-mlp": MLPProjector,
    "fused-gelu-mlp": FusedMLPProjector,
    "fused-ldpnet": FusedLDPProjector,
    "msc": MSCProjector,  # ML-Mamba's Mamba-2 Scan Connector
    "vss-l2": VSSProjector,  # VL-Mamba's connector (its paper; no code was released)
    "rmsnorm-relu2-mlp": RMSReLU2Projector,  # the Nemotron VLMs' (`mlp1`)
}


def seed_groups(projector: nn.Module) -> dict[str, nn.Module]:
    """The groups a Cobra / ML-Mamba checkpoint stores this projector's weights under, each with the
    submodule it fills: a projector's own `SEED_GROUPS` (attribute names), else one group, `projector`."""
    names = getattr(projector, "SEED_GROUPS", None)
    return {name: getattr(projector, name) for name in names} if names else {"projector": projector}


def projector_from_groups(groups: set[str]) -> str | None:
    """The projector whose own checkpoint groups a seed checkpoint holds (ML-Mamba's `msc`), or None: the
    run config names it (Cobra's `projector` group is every other projector's)."""
    for name, cls in PROJECTORS.items():
        own = getattr(cls, "SEED_GROUPS", ())
        if own and set(own) <= groups:
            return name
    return None


def create_projector(name: str, vision_dim: int, llm_dim: int, **options) -> nn.Module:
    """`options` go to the projector (e.g. the MSC's Mamba-2 sizes, for tiny test models)."""
    if name not in PROJECTORS:
        raise KeyError(f"unknown projector {name!r}; known: {sorted(PROJECTORS)}")
    return PROJECTORS[name](vision_dim, llm_dim, **options)


__all__ = [
    "PROJECTORS",
    "FusedLDPProjector",
    "FusedMLPProjector",
    "LinearProjector",
    "MLPProjector",
    "MSCProjector",
    "RMSReLU2Projector",
    "VSSProjector",
    "create_projector",
    "projector_from_groups",
    "seed_groups",
]
