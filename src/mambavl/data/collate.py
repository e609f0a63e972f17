"""Encoded samples -> model inputs: a map-style dataset that loads and transforms each image, and the
collator that right-pads a micro-batch (the LM takes right padding exactly; see `vlm.sequence`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from PIL import Image

from mambavl.data.encode import Encoded
from mambavl.vision.images import DEFAULT_MAX_PIXELS, load_image
from mambavl.vlm.sequence import IGNORE_INDEX


@dataclass
class TrainBatch:
    ids: list[str]
    input_ids: torch.Tensor  # [B, T] right-padded
    labels: torch.Tensor  # [B, T] IGNORE_INDEX where nothing is learned
    lengths: torch.Tensor  # [B] text tokens per row
    image_rows: torch.Tensor  # [N] the rows that have an image
    image_at: torch.Tensor  # [B] text position each row's image goes before
    pixel_values: object  # [N, ...] stacked, a dict of them (fused towers), or a list of images (AnyRes)

    @property
    def learned_tokens(self) -> int:
        """Tokens the loss is taken on (labels shifted by one, as the loss sees them)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def to(self, device, dtype: torch.dtype | None = None) -> TrainBatch:
        def move(x, floating=False):
            if isinstance(x, dict):
                return {k: move(v, floating) for k, v in x.items()}
            if isinstance(x, torch.Tensor):
                return x.to(device=device, dtype=dtype if floating and dtype else x.dtype)
            return x

        return TrainBatch(
            self.ids,
            move(self.input_ids),
            move(self.labels),
            move(self.lengths),
            move(self.image_rows),
            move(self.image_at),
            move(self.pixel_values, floating=True),
        )

    def model_inputs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "ids"}


class TrainDataset(torch.utils.data.Dataset):
    """`examples[i]` is an Encoded sample whose `image` is a full path (or None). `transform` is the
    tower's image transform; with `anyres` the image itself is passed on (the model tiles it).
    `blank_images` replaces every image by a uniform grey one of the same size (a blind baseline)."""

    def __init__(
        self,
        examples: list[Encoded],
        transform,
        anyres: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        blank_images: bool = False,
        cache: bool = False,
    ):
        self.examples = examples
        self.transform = transform
        self.anyres = anyres
        self.max_pixels = max_pixels
        self.blank_images = blank_images
        self.cache: dict[int, object] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[Encoded, object]:
        ex = self.examples[i]
        if ex.image is None:
            return ex, None
        if self.cache is not None:
            if i not in self.cache:
                self.cache[i] = self._image(ex)
            return ex, self.cache[i]
        return ex, self._image(ex)

    def _image(self, ex: Encoded):
        img = load_image(Path(ex.image), self.max_pixels)
        if self.blank_images:
            img = Image.new("RGB", img.size, (128, 128, 128))
        return img if self.anyres else self.transform(img)


def _stack(pixels: list):
    if isinstance(pixels[0], dict):
        return {k: torch.stack([p[k] for p in pixels]) for k in pixels[0]}
    if isinstance(pixels[0], torch.Tensor):
        return torch.stack(pixels)
    return list(pixels)


def collate(items: list[tuple[Encoded, object]]) -> TrainBatch:
    width = max(len(ex.input_ids) for ex, _ in items)
    B = len(items)
    input_ids = torch.zeros(B, width, dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    rows, pixels = [], []
    for b, (ex, px) in enumerate(items):
        n = len(ex.input_ids)
        input_ids[b, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(ex.labels, dtype=torch.long)
        if px is not None:
            rows.append(b)
            pixels.append(px)
    return TrainBatch(
        ids=[ex.id for ex, _ in items],
        input_ids=input_ids,
        labels=labels,
        lengths=torch.tensor([len(ex.input_ids) for ex, _ in items], dtype=torch.long),
        image_rows=torch.tensor(rows, dtype=torch.long),
        image_at=torch.tensor([ex.image_at for ex, _ in items], dtype=torch.long),
        pixel_values=_stack(pixels) if pixels else None,
    )
