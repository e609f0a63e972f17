"""AnyRes (LLaVA-NeXT, as Viper uses it): an image is tiled at the grid resolution that fits it best,
plus one global view; after the tower, the grid's features are merged back into one map, the padding
cut away ("spatial_unpad"), and a learned newline embedding appended after every row.

Token order: [global view: 24×24 row-major] + [grid: rows of (cols·24 features + 1 newline)].
"""

from __future__ import annotations

import math

import torch
from PIL import Image


def grid_pinpoints(
    base: int = 336, max_cells: int = 16, max_side: int | None = None
) -> list[tuple[int, int]]:
    """Every (base·x, base·y) with x·y ≤ max_cells and x, y ≤ max_side (Viper's training uses 15)."""
    side = max_side or max_cells
    return [
        (base * x, base * y) for x in range(1, side + 1) for y in range(1, side + 1) if x * y <= max_cells
    ]


def select_best_resolution(size: tuple[int, int], candidates: list[tuple[int, int]]) -> tuple[int, int]:
    """The candidate (w, h) that keeps the most of the image's pixels, then wastes the least."""
    width, height = size
    best, best_effective, best_waste = None, -1, math.inf
    for cw, ch in candidates:
        scale = min(cw / width, ch / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = cw * ch - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (cw, ch), effective, waste
    return best


def resize_and_pad(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Resize keeping the aspect ratio to fit `target`, centred on black."""
    width, height = image.size
    tw, th = target
    if tw / width < th / height:
        nw, nh = tw, min(math.ceil(height * tw / width), th)
    else:
        nw, nh = min(math.ceil(width * th / height), tw), th
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(image.resize((nw, nh), Image.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def anyres_views(
    image: Image.Image, pinpoints: list[tuple[int, int]], base: int
) -> tuple[list[Image.Image], tuple[int, int]]:
    """[global view squashed to base², then the base×base grid crops row-major], grid (cols, rows)."""
    tw, th = select_best_resolution(image.size, pinpoints)
    padded = resize_and_pad(image, (tw, th))
    crops = [padded.crop((x, y, x + base, y + base)) for y in range(0, th, base) for x in range(0, tw, base)]
    return [image.resize((base, base), Image.BICUBIC), *crops], (tw // base, th // base)


def unpad(features: torch.Tensor, original: tuple[int, int]) -> torch.Tensor:
    """[C, H, W] features of the padded canvas -> those of the image itself (LLaVA-NeXT `unpad_image`)."""
    width, height = original
    _, ch, cw = features.shape
    if width / height > cw / ch:
        new_h = int(height * cw / width)
        pad = (ch - new_h) // 2
        return features[:, pad : ch - pad, :]
    new_w = int(width * ch / height)
    pad = (cw - new_w) // 2
    return features[:, :, pad : cw - pad]


def merge_anyres(
    features: torch.Tensor, grid: tuple[int, int], original: tuple[int, int], newline: torch.Tensor
) -> torch.Tensor:
    """features [1 + cols·rows, side², C] (projected) -> the token sequence [N, C] ("spatial_unpad")."""
    cols, rows = grid
    n, tokens, c = features.shape
    side = math.isqrt(tokens)
    if n != 1 + cols * rows or side * side != tokens:
        raise ValueError(
            f"expected 1 + {cols}×{rows} views of a square patch grid, got {n} views of {tokens}"
        )
    base, tiles = features[0], features[1:]
    grid_map = (
        tiles.view(rows, cols, side, side, c).permute(4, 0, 2, 1, 3).reshape(c, rows * side, cols * side)
    )
    grid_map = unpad(grid_map, original)
    grid_map = torch.cat(
        [grid_map, newline[:, None, None].expand(c, grid_map.shape[1], 1).to(grid_map)], dim=-1
    )
    return torch.cat([base, grid_map.flatten(1).transpose(0, 1)], dim=0)
