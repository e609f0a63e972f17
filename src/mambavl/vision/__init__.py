"""Vision towers (timm; C-RADIO), image transforms with the seeds' resize strategies, safe image loading."""

from mambavl.vision.images import ImageError, load_image
from mambavl.vision.radio import RadioConfig, RadioTower
from mambavl.vision.towers import (
    RADIO_TOWERS,
    TOWER_SETS,
    TOWERS,
    FusedTower,
    TowerConfig,
    VisionTower,
    create_tower,
    tower_names,
)
from mambavl.vision.transforms import RESIZE_STRATEGIES, ImageTransform

__all__ = [
    "RADIO_TOWERS",
    "RESIZE_STRATEGIES",
    "TOWERS",
    "TOWER_SETS",
    "FusedTower",
    "ImageError",
    "ImageTransform",
    "RadioConfig",
    "RadioTower",
    "TowerConfig",
    "VisionTower",
    "create_tower",
    "load_image",
    "tower_names",
]
