"""Vision towers against timm's own modules, the fused tower, transforms, and image loading."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mambavl.vision import (
    TOWERS,
    FusedTower,
    ImageError,
    ImageTransform,
    VisionTower,
    create_tower,
    load_image,
)


def timm_reference_features(model, pixels, index):
    """The seeds' featurisation spelled out with timm's modules: embed, blocks 0..index, drop prefix."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(pixels))))
    for block in model.blocks[: index + 1]:
        x = block(x)
    return x[:, model.num_prefix_tokens :]


@torch.no_grad()
@pytest.mark.parametrize("name", ["tiny-dinov2", "tiny-siglip", "tiny-clip"])
def test_tower_features_equal_timm(name):
    torch.manual_seed(0)
    tower = VisionTower(TOWERS[name]).eval()
    pixels = torch.randn(2, 3, tower.image_size, tower.image_size)
    got = tower(pixels)
    index = len(tower.model.blocks) - 2
    assert got.shape == (2, tower.num_patches, tower.embed_dim)
    torch.testing.assert_close(got, timm_reference_features(tower.model, pixels, index))
    # prismatic's own call: get_intermediate_layers(n={len(blocks) - 2}) (timm >= 1.0 returns a list)
    torch.testing.assert_close(got, tower.model.get_intermediate_layers(pixels, n={index})[0])


@torch.no_grad()
def test_fused_tower_concatenates_dino_then_siglip():
    tower = create_tower("tiny-dinosiglip").eval()
    assert isinstance(tower, FusedTower) and list(tower.towers) == ["dino", "siglip"]
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8))
    pixels = {k: v[None] for k, v in tower.transform("resize-naive")(img).items()}
    out = tower(pixels)
    assert out.shape == (1, 16, 32 + 48)
    torch.testing.assert_close(out[..., :32], tower.towers["dino"](pixels["dino"]))
    torch.testing.assert_close(out[..., 32:], tower.towers["siglip"](pixels["siglip"]))
    # each tower normalises with its own statistics
    assert not torch.equal(pixels["dino"], pixels["siglip"])


@pytest.mark.parametrize(
    "name,params,patches,dim",
    [
        ("dinov2-vit-l-reg4-384", 303.7e6, 729, 1024),
        ("siglip-so400m-384", 428.2e6, 729, 1152),  # incl. the unused attention-pool head
        ("clip-vit-l-336", 303.5e6, 576, 1024),
    ],
)
def test_full_size_towers(name, params, patches, dim):
    with torch.device("meta"):
        tower = VisionTower(TOWERS[name])
    n = sum(p.numel() for p in tower.parameters())
    assert abs(n - params) / params < 1e-3, n
    assert (tower.num_patches, tower.embed_dim) == (patches, dim)


def test_tower_statistics_come_from_timm():
    assert VisionTower(TOWERS["tiny-siglip"]).mean == (0.5, 0.5, 0.5)
    assert VisionTower(TOWERS["tiny-dinov2"]).mean == (0.485, 0.456, 0.406)
    assert VisionTower(TOWERS["tiny-clip"]).mean == (0.48145466, 0.4578275, 0.40821073)


def test_resize_strategies():
    mean, std = (0.5, 0.25, 0.125), (0.5, 0.5, 0.5)
    img = Image.new("RGB", (90, 30), (255, 255, 255))
    naive = ImageTransform(24, mean, std, resize="resize-naive")(img)
    crop = ImageTransform(24, mean, std, resize="resize-crop")(img)
    box = ImageTransform(24, mean, std, resize="letterbox")(img)
    assert naive.shape == crop.shape == box.shape == (3, 24, 24)
    white = (1 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(naive[:, 12, 12], white)
    torch.testing.assert_close(crop[:, 0, 0], white)  # the crop keeps only image content
    # letterbox: a wide image gets bands of the mean colour (int(mean·255)/255) above and below
    fill = torch.tensor([int(m * 255) / 255 for m in mean])
    torch.testing.assert_close(
        box[:, 0, 12], (fill - torch.tensor(mean)) / torch.tensor(std), atol=1e-2, rtol=0
    )
    torch.testing.assert_close(box[:, 12, 12], white)
    with pytest.raises(ValueError, match="resize strategy"):
        ImageTransform(24, mean, std, resize="stretch")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA", "L", "I;16", "I", "F", "CMYK", "1", "YCbCr"])
def test_every_pil_mode_becomes_rgb(mode):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 255, (9, 13, 3), dtype=np.uint8))
    img = rgb.convert("L").convert(mode) if mode in ("I;16", "I", "F", "1", "LA") else rgb.convert(mode)
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (13, 9)


def test_16_bit_grey_uses_its_range():
    a = np.linspace(0, 4000, 16 * 16).reshape(16, 16).astype(np.uint16)
    img = Image.fromarray(a)
    assert img.mode.startswith("I;16")
    out = np.asarray(load_image(img))
    assert out.min() == 0 and out.max() == 255  # not clipped to white, as a plain convert would


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(img).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    assert load_image(buf.getvalue()).size == (10, 20)


def test_paths_bytes_and_tiny_images(tmp_path):
    path = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(path)
    assert load_image(path).getpixel((0, 0)) == (1, 2, 3)
    assert load_image(str(path)).size == (1, 1)
    assert load_image(path.read_bytes()).size == (1, 1)


def test_bad_images(tmp_path):
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="not an image file"):
        load_image(b"definitely not an image")
    with pytest.raises(ImageError, match="expected a PIL image, a path or image bytes"):
        load_image(12)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buf, format="PNG"
    )
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (4000, 3000)).save(path)  # compresses to almost nothing: a bomb in miniature
    with pytest.raises(ImageError, match=r"4000×3000 = 12,000,000 pixels exceeds the limit of 1,000,000"):
        load_image(path, max_pixels=1_000_000)
    assert load_image(path, max_pixels=20_000_000).size == (4000, 3000)
