"""Image → tensor for a tower, with the seeds' resize strategies (prismatic's names):
`resize-naive` squashes to the square input size; `resize-crop` resizes the short side and centre-crops;
`letterbox` pads to a square with the tower's mean colour first, then resize-crops. (`dynamic` keeps each
image at its own size: the RADIO tower's transform, `vision.radio`.)"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

SQUARE_RESIZES = ("resize-naive", "resize-crop", "letterbox")
RESIZE_STRATEGIES = (*SQUARE_RESIZES, "dynamic")  # dynamic: each image at its own size (RADIO towers)
_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


@dataclass(frozen=True)
class ImageTransform:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize: str = "resize-naive"

    def __post_init__(self):
        if self.resize not in SQUARE_RESIZES:
            raise ValueError(
                f"resize strategy {self.resize!r} does not apply to a square tower; "
                f"expected one of {SQUARE_RESIZES}"
            )

    @property
    def fill(self) -> tuple[int, int, int]:
        """The letterbox padding colour: the mean pixel in 0..255."""
        return tuple(int(m * 255) for m in self.mean)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        mode = _INTERPOLATION[self.interpolation]
        if self.resize == "letterbox":
            # prismatic pads the same amount on both sides (an odd difference leaves the image one pixel
            # short of square, which the centre crop then absorbs)
            w, h = img.size
            side = max(w, h)
            px, py = (side - w) // 2, (side - h) // 2
            img = ImageOps.expand(img, border=(px, py, px, py), fill=self.fill)
        if self.resize == "resize-naive":
            img = TF.resize(img, [self.size, self.size], interpolation=mode)
        else:
            img = TF.center_crop(TF.resize(img, self.size, interpolation=mode), self.size)
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)
