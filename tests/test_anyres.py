"""AnyRes tiling and the spatial_unpad merge (LLaVA-NeXT's algorithm, as Viper uses it)."""

import numpy as np
import pytest
import torch
from PIL import Image

from mambavl.vision.anyres import (
    anyres_views,
    grid_pinpoints,
    merge_anyres,
    resize_and_pad,
    select_best_resolution,
)

PINPOINTS = grid_pinpoints(336, 16)


def test_pinpoints():
    assert (1344, 1344) in PINPOINTS and (336 * 16, 336) in PINPOINTS
    assert all(w // 336 * (h // 336) <= 16 for w, h in PINPOINTS)
    assert (1680, 1680) not in PINPOINTS


@pytest.mark.parametrize(
    "size,best",
    [
        ((336, 336), (336, 336)),
        ((672, 336), (672, 336)),
        # 5×3 tiles keep 1680×840 of a 2000×1000 image, more than the 2:1 grid 1344×672 would
        ((2000, 1000), (1680, 1008)),
        # a small portrait image fits whole in several grids: the one that wastes least wins
        ((500, 1500), (672, 1680)),
    ],
)
def test_best_resolution(size, best):
    assert select_best_resolution(size, PINPOINTS) == best


def test_resize_and_pad_centres_on_black():
    img = Image.new("RGB", (100, 50), (255, 255, 255))
    out = np.asarray(resize_and_pad(img, (336, 336)))
    assert out.shape == (336, 336, 3)
    assert (out[0, 0] == 0).all() and (out[-1, -1] == 0).all()  # bands above and below
    assert (out[168, 168] == 255).all() and (out[84, 0] == 255).all()  # content spans the width, centred


def test_views_are_global_then_grid_row_major():
    arr = np.zeros((336, 672, 3), dtype=np.uint8)
    arr[:, 336:] = 255  # right half white
    views, grid = anyres_views(Image.fromarray(arr), PINPOINTS, 336)
    assert grid == (2, 1) and len(views) == 3
    assert all(v.size == (336, 336) for v in views)
    assert np.asarray(views[1]).max() == 0 and np.asarray(views[2]).min() == 255


def test_merge_orders_rows_appends_newlines_and_unpads():
    side, c = 2, 1
    # 2 columns × 1 row of 2×2 tiles; feature value = 10·row + column in the merged 2×4 map
    left = torch.tensor([[0.0, 1.0], [10.0, 11.0]]).reshape(4, 1)
    right = torch.tensor([[2.0, 3.0], [12.0, 13.0]]).reshape(4, 1)
    base = torch.full((4, 1), -1.0)
    newline = torch.tensor([99.0])
    out = merge_anyres(torch.stack([base, left, right]), (2, 1), (672, 336), newline)
    assert out[:, 0].tolist() == [-1] * 4 + [0, 1, 2, 3, 99, 10, 11, 12, 13, 99]
    # a wider original (4:1) than the canvas (2:1): rows of padding are cut from the merged map
    tiles = torch.randn(1 + 2, 16, c)  # side 4: the merged map is 4 × 8
    cut = merge_anyres(tiles, (2, 1), (1000, 250), newline)
    assert cut.shape[0] == 16 + 2 * (8 + 1)  # 2 rows of the 4 survive, each with its newline
    with pytest.raises(ValueError, match="1 \\+ 2×1 views"):
        merge_anyres(torch.randn(2, side * side, c), (2, 1), (672, 336), newline)
