"""Validating a dataset before training: every unusable sample, with its id and the reason."""

from __future__ import annotations

from pathlib import Path

from mambavl.data.encode import encode_align, encode_finetune
from mambavl.data.llava import Problem, Sample, read_llava
from mambavl.vision.images import ImageError, load_image


def image_tokens(vlm) -> int | None:
    """Image positions per sample for single-view models (None for AnyRes: it depends on the image)."""
    import torch

    if vlm.config.anyres is not None:
        return None
    features = torch.zeros(1, vlm.vision.num_patches, vlm.vision.embed_dim, device=vlm.device)
    with torch.no_grad():  # e.g. 729 patches, or 196 after LDPv2's pooling
        return vlm.projector(features.to(next(vlm.projector.parameters()).dtype)).shape[1]


def check_samples(
    samples: list[Sample], image_root: Path | None, vlm, stage: str = "finetune", decode_images: bool = True
) -> tuple[list[Sample], list[Problem]]:
    """The samples that can train, and a Problem for each one that cannot (missing / corrupt image,
    over-long for the model)."""
    good, problems = [], []
    per_image = image_tokens(vlm)
    limit = vlm.config.max_length
    for sample in samples:
        if sample.image is not None:
            path = (image_root or Path(".")) / sample.image
            if not path.is_file():
                problems.append(Problem(sample.id, f"image {sample.image} not found under {image_root}"))
                continue
            if decode_images:
                try:
                    load_image(path, vlm.config.max_pixels)
                except ImageError as e:
                    problems.append(Problem(sample.id, f"image {sample.image}: {e}"))
                    continue
        if stage == "align":
            encoded = encode_align(sample, vlm.tokenizer)
        else:
            encoded = encode_finetune(
                sample, vlm.tokenizer, vlm.get_prompt_builder(), vlm.config.image_placement
            )
        length = len(encoded.input_ids) + ((per_image or 0) if sample.image is not None else 0)
        if length > limit:
            problems.append(
                Problem(sample.id, f"{length} positions (text + image) exceed the model's {limit}")
            )
            continue
        good.append(sample)
    return good, problems


def check_file(
    annotations: Path, image_root: Path | None, vlm, stage: str = "finetune", decode_images: bool = True
):
    """All samples of a LLaVA file that can train, and every problem (parse and content) by id."""
    if not Path(annotations).is_file():
        raise FileNotFoundError(f"{annotations}: no such annotation file")
    samples, problems = read_llava(annotations)
    good, more = check_samples(samples, image_root, vlm, stage, decode_images)
    return good, problems + more
