"""Samples -> token ids and labels, as the seeds train.

Finetune (Cobra / prismatic): each turn is formatted by the model's prompt builder and tokenized on its own;
human turns are ignored (IGNORE_INDEX), answers are learned including their end-of-text token.
Align: `{caption}<|endoftext|>`, every token learned (Cobra's AlignDataset). The image's position is
returned, not its tokens: the collator splices the image embeddings there (0 for image-first models).
"""

from __future__ import annotations

from dataclasses import dataclass

from mambavl.data.llava import Sample
from mambavl.vlm.sequence import IGNORE_INDEX, IMAGE_PLACEHOLDER, wrap_image_marker


@dataclass(frozen=True)
class Encoded:
    id: str
    input_ids: list[int]
    labels: list[int]
    image: str | None
    image_at: int  # token index where the image embeddings go


def _encode_with_image(tokenizer, text: str, wrap: tuple[str, str] | None) -> tuple[list[int], int | None]:
    """Token ids of `text` without its `<image>` marker (the model's `wrap` around it), and where the
    image goes (in tokens)."""
    if IMAGE_PLACEHOLDER not in text:
        return tokenizer.encode(text), None
    before, after = wrap_image_marker(*text.split(IMAGE_PLACEHOLDER, 1), wrap)
    head = tokenizer.encode(before)
    return head + tokenizer.encode(after.replace(IMAGE_PLACEHOLDER, "")), len(head)


def encode_finetune(
    sample: Sample,
    tokenizer,
    builder,
    image_placement: str = "first",
    image_wrap: tuple[str, str] | None = None,
) -> Encoded:
    """`builder`: a fresh prompt builder of the model (`vlm.get_prompt_builder()`); `image_wrap`: the
    model's text around the image (`VLMConfig.image_wrap`)."""
    ids: list[int] = []
    labels: list[int] = []
    image_at = None
    rendered = ""
    for role, text in sample.conversations:
        builder.add_turn(role, text)
        prompt = builder.get_prompt()
        if not prompt.startswith(rendered):
            raise ValueError(
                "the prompt format re-renders earlier turns; it cannot be tokenized turn by turn"
            )
        piece, rendered = prompt[len(rendered) :], prompt
        if image_placement == "placeholder":
            tokens, at = _encode_with_image(tokenizer, piece, image_wrap)
            if at is not None and image_at is None:
                image_at = len(ids) + at
        else:
            tokens = tokenizer.encode(piece.replace(IMAGE_PLACEHOLDER, ""))
        ids += tokens
        labels += [IGNORE_INDEX] * len(tokens) if role == "human" else tokens
    if sample.image is not None and image_at is None:
        image_at = 0
    return Encoded(sample.id, ids, labels, sample.image, image_at or 0)


def encode_align(sample: Sample, tokenizer) -> Encoded:
    """The caption (the last answer) followed by end-of-text; all of it learned, the image first."""
    caption = sample.conversations[-1][1].replace(IMAGE_PLACEHOLDER, "").strip()
    ids = tokenizer.encode(caption + tokenizer.eos_token)
    return Encoded(sample.id, ids, list(ids), sample.image, 0)
