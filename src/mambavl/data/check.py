"""Validating a dataset before training: every unusable sample, with its id and the reason. The same
checks gate training (`data.mixture`), so an image path that leaves its root is never opened there either."""

from __future__ import annotations

from pathlib import Path

from mambavl.checkpoints.files import PathError, confined
from mambavl.data.encode import Encoded, encode_align, encode_finetune
from mambavl.data.llava import Problem, Sample, read_llava
from mambavl.vision.images import ImageError, load_image


def image_tokens(vlm) -> int | None:
    """Image positions per sample, or None where they vary (AnyRes, or a tower at each image's size)."""
    return None if vlm.images_vary else vlm.positions_per_view


def image_problem(image: str, image_root: Path, max_pixels: int, decode: bool = True) -> str | None:
    """Why a sample's image cannot be used, or None. Its path comes from the annotations file, so it must
    stay under the image root: no absolute paths, no '..' out of it, no symlink pointing elsewhere."""
    try:
        path = confined(image_root, image)
    except PathError as e:
        return f"image {e}; image paths must stay under the image root"
    if not path.is_file():
        return f"image {image} not found under {image_root}"
    if decode:
        try:
            load_image(path, max_pixels)
        except ImageError as e:
            return f"image {image}: {e}"
    return None


def encode_sample(sample: Sample, vlm, stage: str = "finetune") -> Encoded:
    """A sample's ids and labels as the stage trains on them."""
    if stage == "align":
        return encode_align(sample, vlm.tokenizer)
    return encode_finetune(
        sample, vlm.tokenizer, vlm.get_prompt_builder(), vlm.config.image_placement, vlm.config.image_wrap
    )


def model_for_checking(model: str, stage: str = "finetune"):
    """The model whose tokenizer, prompt format and limits a check applies: a preset built on the meta
    device (no memory, no weights: nothing else of it is needed), or any model `mambavl.load` reads. A
    preset's tokenizer comes first, as it is the one thing the check may need from the hub: offline, that
    fails at once instead of after the model is built. Errors are CheckpointErrors (HubUnavailable)."""
    from mambavl.checkpoints.vlm import load
    from mambavl.presets import PRESETS
    from mambavl.vlm.model import create
    from mambavl.vlm.tokenizer import load_tokenizer

    if model not in PRESETS:
        vlm = load(model)
    else:
        tokenizer = load_tokenizer(PRESETS[model].tokenizer, PRESETS[model].eos_token)
        vlm = create(model, device="meta")
        vlm.tokenizer = tokenizer
    prepare_text(vlm, stage)
    return vlm


def prepare_text(vlm, stage: str) -> None:
    """Loads what tokenizing needs (the tokenizer; for finetuning, the prompt format, which may be a hub
    chat template) before any sample is looked at. A model that cannot provide them is a problem of the
    set-up, raised as such (a CheckpointError), never reported as a problem of every sample."""
    vlm.tokenizer  # noqa: B018 -- a property that loads it
    if stage != "align":
        vlm.get_prompt_builder()


def check_samples(
    samples: list[Sample], image_root: Path | None, vlm, stage: str = "finetune", decode_images: bool = True
) -> tuple[list[Sample], list[Problem]]:
    """The samples that can train, and a Problem for each one that cannot (an image missing, corrupt or
    outside the image root; text the model cannot tokenize; over-long for the model). A model whose
    tokenizer cannot be loaded raises (see `prepare_text`)."""
    prepare_text(vlm, stage)
    good, problems = [], []
    per_image = image_tokens(vlm)
    limit = vlm.config.max_length
    root = image_root or Path(".")
    for sample in samples:
        image = sample.image
        if image is not None and (reason := image_problem(image, root, vlm.config.max_pixels, decode_images)):
            problems.append(Problem(sample.id, reason))
            continue
        try:
            encoded = encode_sample(sample, vlm, stage)
        except (ValueError, TypeError) as e:  # the tokenizer or the prompt format refuses this text
            problems.append(Problem(sample.id, f"cannot be tokenized ({type(e).__name__}: {e})"))
            continue
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
    """All samples of a LLaVA file that can train, and every problem (parse and content) by id. Images
    are looked up under `image_root` (default: the file's folder, as training does). Only a file that
    cannot be read at all raises (FileNotFoundError, AnnotationsError)."""
    if not Path(annotations).is_file():
        raise FileNotFoundError(f"{annotations}: no such annotation file")
    samples, problems = read_llava(annotations)
    root = image_root if image_root is not None else Path(annotations).parent
    good, more = check_samples(samples, root, vlm, stage, decode_images)
    return good, problems + more
