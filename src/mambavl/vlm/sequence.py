"""The multimodal sequence: image embeddings spliced into the text embeddings where the seed puts them,
labels masked where nothing is to be learned, and ragged rows packed for the LM.

Cobra and ML-Mamba put all image embeddings first (no BOS): [image (P) | text (T)]. Rows of a batch
differ in length (text-only rows have no image at all), so rows are right-padded and their lengths
passed to the LM, which turns padding into exact identity steps of the recurrent state. Left padding,
the transformer habit, would instead run the padding through the scan before the real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class MultimodalBatch:
    embeds: torch.Tensor  # [B, L, D], right-padded with zeros
    lengths: torch.Tensor  # [B] real positions per row
    labels: torch.Tensor | None = None  # [B, L]: IGNORE_INDEX on image, prompt and padding positions
    image_positions: torch.Tensor | None = None  # [B, L] bool, True where an image embedding sits


def splice(
    text_embeds: torch.Tensor,
    image_embeds: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    at: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One row: [T, D] text with [P, D] image embeddings inserted before text position `at` ->
    [P + T, D] (and labels with IGNORE_INDEX on the image). `at=0`: image first (Cobra, ML-Mamba)."""
    if image_embeds is None:
        return text_embeds, labels
    if image_embeds.shape[-1] != text_embeds.shape[-1]:
        raise ValueError(
            f"image embeddings have width {image_embeds.shape[-1]}, "
            f"the LM's embeddings {text_embeds.shape[-1]}"
        )
    if not 0 <= at <= text_embeds.shape[0]:
        raise ValueError(f"image position {at} is outside the text's {text_embeds.shape[0]} tokens")
    image_embeds = image_embeds.to(text_embeds.dtype)
    embeds = torch.cat([text_embeds[:at], image_embeds, text_embeds[at:]], dim=0)
    if labels is not None:
        ignore = labels.new_full((image_embeds.shape[0],), IGNORE_INDEX)
        labels = torch.cat([labels[:at], ignore, labels[at:]])
    return embeds, labels


def splice_image_first(
    text_embeds: torch.Tensor, image_embeds: torch.Tensor | None, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One row: [P, D] image + [T, D] text -> [P + T, D] (and labels with IGNORE_INDEX on the image)."""
    return splice(text_embeds, image_embeds, labels, 0)


def pack(
    text_embeds: list[torch.Tensor],
    image_embeds: list[torch.Tensor | None],
    labels: list[torch.Tensor] | None = None,
    image_at: list[int] | None = None,
) -> MultimodalBatch:
    """Rows of (text [T_i, D], image [P_i, D] or None, labels [T_i]) -> one right-padded batch; each
    image goes before its row's text position `image_at[i]` (default 0: image first)."""
    if len(text_embeds) != len(image_embeds) or (labels is not None and len(labels) != len(text_embeds)):
        raise ValueError("pack needs one image (or None) and one label row per text row")
    if labels is not None and any(
        lb.shape[0] != t.shape[0] for lb, t in zip(labels, text_embeds, strict=True)
    ):
        raise ValueError("every label row must be as long as its text")
    rows, label_rows, image_masks = [], [], []
    for i, (text, image) in enumerate(zip(text_embeds, image_embeds, strict=True)):
        at = 0 if image_at is None else int(image_at[i])
        row, lab = splice(text, image, None if labels is None else labels[i], at)
        n_image = 0 if image is None else image.shape[0]
        rows.append(row)
        label_rows.append(lab)
        where = torch.arange(row.shape[0])
        image_masks.append((where >= at) & (where < at + n_image))
    lengths = torch.tensor([r.shape[0] for r in rows])
    if int(lengths.min()) == 0:
        raise ValueError("a row is empty: every sample needs at least one token or an image")
    width = int(lengths.max())
    embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
    positions = torch.zeros(len(rows), width, dtype=torch.bool)
    out_labels = None if labels is None else torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        embeds[i, : row.shape[0]] = row
        positions[i, : row.shape[0]] = image_masks[i]
        if out_labels is not None:
            out_labels[i, : row.shape[0]] = label_rows[i]
    return MultimodalBatch(embeds, lengths, out_labels, positions)


IMAGE_PLACEHOLDER = "<image>"


def split_at_placeholder(prompt: str) -> tuple[str, str]:
    """LLaVA-style prompts mark the image with one `<image>`: the text before and after it."""
    count = prompt.count(IMAGE_PLACEHOLDER)
    if count != 1:
        raise ValueError(
            f"the prompt holds {count} '{IMAGE_PLACEHOLDER}' markers; this model needs exactly one where the "
            "image goes (none for a text-only prompt)"
        )
    before, after = prompt.split(IMAGE_PLACEHOLDER)
    return before, after


def wrap_image_marker(before: str, after: str, wrap: tuple[str, str] | None) -> tuple[str, str]:
    """The text either side of the image with the model's own markers around it (Nemotron's `<img>` and
    `</img>`), so that the image's positions sit between them as the model was trained."""
    return (before, after) if not wrap else (before + wrap[0], wrap[1] + after)
