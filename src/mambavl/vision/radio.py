"""C-RADIO, NVIDIA's vision tower of the Nemotron VLMs, at the image's own resolution.

An image is resized to its own patch grid (close to its size, within a patch budget, each side a multiple
of the 2×2 merge: `patch_grid`), cut into patches, projected, given a position embedding cropped from a
table interpolated to the grid's longer side (CPE), and prefixed with learned class and register tokens;
plain pre-norm ViT blocks follow. The prefix is dropped, and every 2×2 block of patch features is merged
into one position ("pixel shuffle"), so the LM sees a quarter as many positions, four times as wide.

Parameter names are the released checkpoint's (`radio_model.model.` removed): `patch_generator.embedder`,
`patch_generator.pos_embed`, `patch_generator.cls_token.token`, `blocks.{i}.attn.qkv` ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class RadioConfig:
    hidden_size: int = 1280
    depth: int = 32
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 16
    max_img_size: int = 2048  # the position table covers max_img_size / patch_size patches a side
    num_cls_tokens: int = 3
    num_registers: int = 7
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    final_norm: bool = False  # a LayerNorm on the features (checkpoints whose LM has MTP layers)
    merge: int = 2  # pixel shuffle: merge × merge patches become one position (downsample ratio 1/merge)
    min_patches: int = 1024  # an image's patch grid holds at least this many patches ...
    max_patches: int = 13312  # ... and at most this many
    image_size: int = 512  # a nominal square size: what a caller without an image (a dry run) uses
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )
        if self.max_patches and self.max_patches < self.merge**2:
            raise ValueError(f"max_patches {self.max_patches} holds no {self.merge}×{self.merge} block")


def patch_grid(height: int, width: int, patch: int, merge: int, min_patches: int, max_patches: int):
    """The (rows, cols) patch grid an image of `height` × `width` pixels is resized to: about its own
    grid, scaled into [min_patches, max_patches], each side rounded to a multiple of `merge` (as the
    released processor rounds: a sliver of an image may pass max_patches by a row or column)."""
    # the released processor's rounding, kept exactly (Python's round: halves to even)
    rows, cols = round(height / patch + 0.5), round(width / patch + 0.5)
    scale = min(math.sqrt(max_patches / (rows * cols)), 1.0)
    # at least one patch a side: the released processor divides by zero (or gives an empty grid) for a
    # sliver of an image, whose short side would round down to nothing
    rows, cols = max(1, math.floor(scale * rows)), max(1, math.floor(scale * cols))
    if max_patches > min_patches and rows * cols < min_patches:
        scale = math.sqrt(min_patches / (rows * cols))
        rows, cols = math.ceil(scale * rows), math.ceil(scale * cols)
    if r := rows % merge:
        rows = rows + merge - r if (rows + merge - r) * cols <= max_patches else max(merge, rows - r)
    if r := cols % merge:
        cols = cols + merge - r if rows * (cols + merge - r) <= max_patches else max(merge, cols - r)
    return rows, cols


@dataclass(frozen=True)
class DynamicTransform:
    """Image → [3, rows × patch, cols × patch] at its own patch grid (`patch_grid`): bicubic with
    antialiasing on float pixels (the overshoot kept), then normalised."""

    patch: int
    merge: int
    min_patches: int
    max_patches: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def grid(self, width: int, height: int) -> tuple[int, int]:
        return patch_grid(height, width, self.patch, self.merge, self.min_patches, self.max_patches)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        rows, cols = self.grid(*img.size)
        pixels = TF.pil_to_tensor(img.convert("RGB")).to(torch.float32)
        size = (rows * self.patch, cols * self.patch)
        if tuple(pixels.shape[-2:]) != size:
            pixels = TF.resize(pixels, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)
        mean = torch.tensor(self.mean).view(3, 1, 1) * 255.0
        std = torch.tensor(self.std).view(3, 1, 1) * 255.0
        return (pixels - mean) / std


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: RadioConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchGenerator(nn.Module):
    """Patches → embeddings + the cropped position embedding, after the class and register tokens."""

    def __init__(self, cfg: RadioConfig):
        super().__init__()
        self.patch = cfg.patch_size
        self.side = cfg.max_img_size // cfg.patch_size
        self.embedder = nn.Linear(3 * cfg.patch_size**2, cfg.hidden_size, bias=False)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.side * self.side, cfg.hidden_size))
        self.cls_token = nn.Module()
        self.cls_token.token = nn.Parameter(
            torch.zeros(cfg.num_cls_tokens + cfg.num_registers, cfg.hidden_size)
        )

    def positions(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """[rows × cols, D]: the table bilinearly resized to the grid's longer side, then cropped."""
        table = self.pos_embed.reshape(1, self.side, self.side, -1).permute(0, 3, 1, 2).float()
        longest = max(rows, cols)
        table = F.interpolate(table, size=(longest, longest), mode="bilinear", align_corners=False)
        return table[0, :, :rows, :cols].flatten(1).t().to(dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        B, C, H, W = pixels.shape
        p = self.patch
        rows, cols = H // p, W // p
        patches = pixels.reshape(B, C, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5).reshape(B, rows * cols, -1)
        x = self.embedder(patches)
        x = x + self.positions(rows, cols, x.dtype)
        return torch.cat([self.cls_token.token.to(x.dtype).expand(B, -1, -1), x], dim=1)


class RadioTower(nn.Module):
    """[B, 3, H, W] (H, W multiples of patch × merge) → [B, (H/p)(W/p)/merge², merge² × hidden]."""

    dynamic = True  # every image at its own size: callers encode images of different sizes apart

    def __init__(self, cfg: RadioConfig):
        super().__init__()
        self.config = cfg
        self.patch_generator = PatchGenerator(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.final_norm else None

    @property
    def embed_dim(self) -> int:
        return self.config.hidden_size * self.config.merge**2

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def num_patches(self) -> int:
        """Positions out of the tower for an image at the nominal size."""
        return self.positions_for(self.config.image_size, self.config.image_size)

    def positions_for(self, height: int, width: int) -> int:
        """Positions out of the tower for a transformed image of `height` × `width` pixels."""
        return (height // self.config.patch_size) * (width // self.config.patch_size) // self.config.merge**2

    def transform(self, resize: str = "dynamic") -> DynamicTransform:
        if resize != "dynamic":
            raise ValueError(
                f"the RADIO tower reads images at their own size (resize 'dynamic'), not {resize!r}"
            )
        c = self.config
        return DynamicTransform(c.patch_size, c.merge, c.min_patches, c.max_patches, c.mean, c.std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        B, _, H, W = pixels.shape
        step = self.config.patch_size * self.config.merge
        if H % step or W % step:
            raise ValueError(f"image of {H}×{W} pixels: both sides must be multiples of {step}")
        x = self.patch_generator(pixels)
        for block in self.blocks:
            x = block(x)
        x = x[:, self.patch_generator.cls_token.token.shape[0] :]
        if self.final_norm is not None:
            x = self.final_norm(x)
        return pixel_shuffle(
            x.reshape(B, H // self.config.patch_size, W // self.config.patch_size, -1), self.config.merge
        )


def pixel_shuffle(x: torch.Tensor, merge: int) -> torch.Tensor:
    """[B, rows, cols, C] → [B, rows/m × cols/m, m² C]: the released model's channel order (columns
    folded first, then rows)."""
    B, rows, cols, C = x.shape
    x = x.reshape(B, rows, cols // merge, C * merge).transpose(1, 2)
    x = x.reshape(B, cols // merge, rows // merge, C * merge * merge).transpose(1, 2)
    return x.reshape(B, -1, C * merge * merge)
