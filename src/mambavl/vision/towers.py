"""Vision towers on timm: a registry of named towers, patch features taken where the seeds take them
(the output of a chosen block, prefix tokens dropped, no final norm), each with its image transform.

A fused tower (Cobra's DINOv2 + SigLIP) runs several towers on the same image, each with its own
transform, and concatenates their features on the channel axis.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from mambavl.vision.radio import RadioConfig, RadioTower
from mambavl.vision.transforms import ImageTransform


@dataclass(frozen=True)
class TowerConfig:
    """One timm ViT. `arch` is a timm model name; `tag` its pretrained weights (None: random init);
    `feature_layer` counts blocks from the end (-2: the output of the second-to-last block, as
    prismatic's `get_intermediate_layers(n={len(blocks) - 2})` and LLaVA's `mm_vision_select_layer=-2`)."""

    arch: str
    image_size: int
    tag: str | None = None
    feature_layer: int = -2
    arch_kwargs: dict = field(default_factory=dict)  # architecture overrides: tiny towers for tests / CPU


# Real towers: timm ids verified against the seeds' code (prismatic / Cobra / LLaVA-NeXT).
TOWERS: dict[str, TowerConfig] = {
    "dinov2-vit-l-reg4-384": TowerConfig("vit_large_patch14_reg4_dinov2", 384, "lvd142m"),
    "siglip-so400m-384": TowerConfig("vit_so400m_patch14_siglip_384", 384, "webli"),
    # OpenAI CLIP uses QuickGELU; timm's plain `vit_large_patch14_clip_336` would use exact GELU.
    "clip-vit-l-336": TowerConfig("vit_large_patch14_clip_quickgelu_336", 336, "openai"),
}
# Tiny towers: the same timm architectures (same code path) at toy sizes, random weights.
_TINY = dict(embed_dim=32, depth=3, num_heads=2)
TOWERS |= {
    "tiny-dinov2": TowerConfig("vit_large_patch14_reg4_dinov2", 56, arch_kwargs=_TINY),
    "tiny-siglip": TowerConfig("vit_so400m_patch14_siglip_384", 56, arch_kwargs=dict(_TINY, embed_dim=48)),
    "tiny-clip": TowerConfig("vit_large_patch14_clip_quickgelu_336", 56, arch_kwargs=_TINY),
}


class VisionTower(nn.Module):
    def __init__(self, config: TowerConfig, pretrained: bool = False):
        super().__init__()
        import timm

        self.config = config
        name = f"{config.arch}.{config.tag}" if config.tag else config.arch
        self.model = timm.create_model(
            name, pretrained=pretrained, num_classes=0, img_size=config.image_size, **config.arch_kwargs
        )
        self.feature_index = len(self.model.blocks) + config.feature_layer
        data = timm.data.resolve_model_data_config(self.model)
        self.mean, self.std = tuple(data["mean"]), tuple(data["std"])
        self.interpolation = data.get("interpolation", "bicubic")

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def num_patches(self) -> int:
        return self.model.patch_embed.num_patches

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def transform(self, resize: str = "resize-naive") -> ImageTransform:
        return ImageTransform(self.image_size, self.mean, self.std, self.interpolation, resize)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] → patch features [B, num_patches, embed_dim]."""
        return self.model.forward_intermediates(
            pixels,
            indices=[self.feature_index],
            norm=False,
            output_fmt="NLC",
            intermediates_only=True,
            stop_early=True,
        )[0]


class FusedTower(nn.Module):
    """Several towers on one image, features concatenated on channels in the given order."""

    def __init__(self, towers: dict[str, VisionTower]):
        super().__init__()
        patches = {t.num_patches for t in towers.values()}
        if len(patches) != 1:
            raise ValueError(f"fused towers must agree on the number of patches, got {patches}")
        self.towers = nn.ModuleDict(towers)

    @property
    def embed_dim(self) -> int:
        return sum(t.embed_dim for t in self.towers.values())

    @property
    def num_patches(self) -> int:
        return next(iter(self.towers.values())).num_patches

    @property
    def image_size(self) -> int:
        return next(iter(self.towers.values())).image_size

    def transform(self, resize: str = "resize-naive") -> FusedTransform:
        return FusedTransform({k: t.transform(resize) for k, t in self.towers.items()})

    def forward(self, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tower(pixels[k]) for k, tower in self.towers.items()], dim=-1)


@dataclass(frozen=True)
class FusedTransform:
    transforms: dict[str, ImageTransform]

    def __call__(self, img) -> dict[str, torch.Tensor]:
        return {k: t(img) for k, t in self.transforms.items()}


# Named tower set-ups as the seeds use them: a single tower id, or a fused set (order = channel order).
TOWER_SETS: dict[str, tuple[str, ...]] = {
    "dinosiglip-vit-so-384px": ("dinov2-vit-l-reg4-384", "siglip-so400m-384"),  # Cobra, ML-Mamba
    "clip-vit-l-336px": ("clip-vit-l-336",),  # Viper (LLaVA-NeXT)
    "tiny-dinosiglip": ("tiny-dinov2", "tiny-siglip"),
    "tiny-clip": ("tiny-clip",),
}
# RADIO towers (the Nemotron VLMs'): our own module, every image at its own size. A checkpoint's
# vision config may override any RadioConfig field (`tower_options`).
RADIO_TOWERS: dict[str, RadioConfig] = {
    "c-radio-h": RadioConfig(),  # C-RADIOv4-H, as the Nemotron Omni VLM uses it
    "tiny-radio": RadioConfig(
        hidden_size=32,
        depth=2,
        num_heads=2,
        patch_size=8,
        max_img_size=128,
        num_cls_tokens=2,
        num_registers=1,
        min_patches=16,
        max_patches=64,
        image_size=64,
    ),
}
_SHORT = {
    "dinov2-vit-l-reg4-384": "dino",
    "siglip-so400m-384": "siglip",
    "tiny-dinov2": "dino",
    "tiny-siglip": "siglip",
}


def tower_names() -> list[str]:
    return sorted(TOWER_SETS | TOWERS | RADIO_TOWERS)


def create_tower(
    name: str, pretrained: bool = False, feature_layer: int | None = None, options: dict | None = None
) -> VisionTower | FusedTower | RadioTower:
    """A tower or fused tower set by name (TOWER_SETS, TOWERS or RADIO_TOWERS); `feature_layer` overrides
    where the features are taken (LLaVA-style configs say it: `mm_vision_select_layer`); `options`
    override a RADIO tower's config fields (its sizes, as a checkpoint's vision config gives them).
    RADIO towers have no weights of their own to fetch: theirs come with the VLM's checkpoint."""
    if name in RADIO_TOWERS:
        if feature_layer is not None:
            raise ValueError(f"tower {name!r} gives its last block's features; feature_layer does not apply")
        try:
            return RadioTower(dataclasses.replace(RADIO_TOWERS[name], **(options or {})))
        except TypeError as e:
            raise ValueError(f"tower options {sorted(options or {})} for {name!r}: {e}") from None
    if options:
        raise ValueError(f"tower {name!r} takes no options, got {sorted(options)}")
    if name not in TOWERS and name not in TOWER_SETS:
        raise KeyError(f"unknown vision tower {name!r}; known: {tower_names()}")
    members = (name,) if name in TOWERS else TOWER_SETS[name]

    def one(member: str) -> VisionTower:
        cfg = TOWERS[member]
        if feature_layer is not None:
            cfg = dataclasses.replace(cfg, feature_layer=feature_layer)
        return VisionTower(cfg, pretrained)

    if len(members) == 1:
        return one(members[0])
    return FusedTower({_SHORT.get(m, m): one(m) for m in members})
