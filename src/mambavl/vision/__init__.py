"""Vision towers (timm), image transforms with the seeds' resize strategies, and safe image loading."""

from mambavl.vision.images import ImageError, load_image
from mambavl.vision.towers import TOWER_SETS, TOWERS, FusedTower, TowerConfig, VisionTower, create_tower
from mambavl.vision.transforms import RESIZE_STRATEGIES, ImageTransform

__all__ = [
    "RESIZE_STRATEGIES",
    "TOWERS",
    "TOWER_SETS",
    "FusedTower",
    "ImageError",
    "ImageTransform",
    "TowerConfig",
    "VisionTower",
    "create_tower",
    "load_image",
]
