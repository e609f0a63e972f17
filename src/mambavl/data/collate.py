"""Encoded samples -> model inputs: a map-style dataset that loads and transforms each image, and the
collator that right-pads a micro-batch (the LM takes right padding exactly; see `vlm.sequence`).

An image that fails to load at batch time (corrupt, cut short, gone) does not stop the loader: its row is
kept with a grey image and nothing to learn, and the batch says which sample it was (`TrainBatch.bad`).
The trainer then refuses it, or with --skip-bad leaves it out of the loss and lists it. Keeping the row
(rather than removing it) keeps every micro-batch's shape, so each process still runs the forward and
backward the others wait for, and a micro-batch of nothing but bad images needs no case of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image

from mambavl.data.encode import Encoded
from mambavl.vision.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from mambavl.vlm.sequence import IGNORE_INDEX

# What stands in for an image that failed to load (the blind baseline's grey); its row learns nothing.
STAND_IN_SIZE = (64, 64)
GREY = (128, 128, 128)


@dataclass(frozen=True)
class BadImage:
    """A sample whose image failed to load at batch time."""

    index: int  # in the dataset (the trainer's per-sample token counts are indexed by it)
    id: str
    image: str
    reason: str


class StandIn(NamedTuple):
    """What the dataset gives in place of an image that failed to load: a grey image's pixels, and why."""

    pixels: object
    bad: BadImage


@dataclass
class TrainBatch:
    ids: list[str]
    input_ids: torch.Tensor  # [B, T] right-padded
    labels: torch.Tensor  # [B, T] IGNORE_INDEX where nothing is learned
    lengths: torch.Tensor  # [B] text tokens per row
    image_rows: torch.Tensor  # [N] the rows that have an image
    image_at: torch.Tensor  # [B] text position each row's image goes before
    pixel_values: object  # [N, ...] stacked, a dict of them (fused towers), or a list of images (AnyRes)
    bad: list[BadImage] = field(default_factory=list)  # rows whose image failed: kept, learning nothing

    @property
    def learned_tokens(self) -> int:
        """Tokens the loss is taken on (labels shifted by one, as the loss sees them)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def _map(self, fn, pixels_fn=None) -> TrainBatch:
        def each(x, fn):
            if isinstance(x, dict):
                return {k: each(v, fn) for k, v in x.items()}
            return fn(x) if isinstance(x, torch.Tensor) else x

        tensors = (self.input_ids, self.labels, self.lengths, self.image_rows, self.image_at)
        pixels = each(self.pixel_values, pixels_fn or fn)
        return TrainBatch(self.ids, *(each(t, fn) for t in tensors), pixels, self.bad)

    def to(self, device, dtype: torch.dtype | None = None) -> TrainBatch:
        """On `device`, the pixels in `dtype` if given. From pinned memory (`pin_memory`, as the loader
        gives it on a GPU) the copies do not wait for the GPU, so the host goes on queueing work. The small
        index tensors (lengths, image rows and positions) stay where they are: the model reads them as
        numbers, and reading them from the GPU would wait for all the work queued before."""
        moved = self._map(
            lambda t: t.to(device, non_blocking=t.is_pinned()),
            lambda t: t.to(device, dtype=dtype or t.dtype, non_blocking=t.is_pinned()),
        )
        return replace(moved, lengths=self.lengths, image_rows=self.image_rows, image_at=self.image_at)

    def pin_memory(self) -> TrainBatch:
        """Every tensor in page-locked memory (the DataLoader calls this with pin_memory=True)."""
        return self._map(lambda t: t.pin_memory())

    def model_inputs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("ids", "bad")}


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
        """The sample and its image: transformed (AnyRes: the image itself), None for a text-only sample,
        a StandIn when it failed to load."""
        ex = self.examples[i]
        if ex.image is None:
            return ex, None
        if self.cache is None:
            return ex, self._image(i, ex)
        if i not in self.cache:
            self.cache[i] = self._image(i, ex)
        return ex, self.cache[i]

    def _image(self, i: int, ex: Encoded):
        path = Path(ex.image)
        try:
            img = load_image(path, self.max_pixels)
        except ImageError as e:  # decided by the file alone: the same at every epoch and after a resume
            stand_in = Image.new("RGB", STAND_IN_SIZE, GREY)
            reason = str(e).removeprefix(f"{path.expanduser()}: ")  # the path is reported beside it
            return StandIn(self._pixels(stand_in), BadImage(i, ex.id, ex.image, reason))
        if self.blank_images:
            img = Image.new("RGB", img.size, GREY)
        return self._pixels(img)

    def _pixels(self, img: Image.Image):
        return img if self.anyres else self.transform(img)


def _stack(pixels: list):
    if isinstance(pixels[0], dict):
        return {k: torch.stack([p[k] for p in pixels]) for k in pixels[0]}
    if isinstance(pixels[0], torch.Tensor):
        return torch.stack(pixels)
    return list(pixels)


def collate(items: list[tuple[Encoded, object]]) -> TrainBatch:
    """Right-padded ids and labels; a row whose image failed (a StandIn) keeps its ids but learns nothing."""
    width = max(len(ex.input_ids) for ex, _ in items)
    B = len(items)
    input_ids = torch.zeros(B, width, dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    rows, pixels, bad = [], [], []
    for b, (ex, px) in enumerate(items):
        n = len(ex.input_ids)
        input_ids[b, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        if isinstance(px, StandIn):
            bad.append(px.bad)
            px = px.pixels
        else:
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
        bad=bad,
    )
