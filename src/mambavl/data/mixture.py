"""Training data from one or more LLaVA files: validated, tokenized for a stage, mixed with weights.

A weight is how many times a source's samples appear per epoch: 1 = each once, 2 = twice, 0.5 = a seeded
half of them (fixed for the whole run). Unusable samples are never dropped silently: training refuses
them (listing each by id) unless told to skip them, and then it says how many and which.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

from mambavl.data.check import check_samples, image_tokens
from mambavl.data.encode import Encoded, encode_align, encode_finetune
from mambavl.data.llava import Problem, read_llava
from mambavl.data.registry import dataset_paths


class DataError(ValueError):
    """A dataset that cannot train as given."""


@dataclass(frozen=True)
class DataSource:
    annotations: Path  # a LLaVA JSON / JSONL file
    images: Path | None = None  # its image root (default: the file's directory)
    weight: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> DataSource:
        """`ANNOTATIONS[:IMAGE_ROOT[:WEIGHT]]`."""
        parts = spec.split(":")
        if not parts[0] or len(parts) > 3:
            raise DataError(f"data source {spec!r}: expected ANNOTATIONS[:IMAGE_ROOT[:WEIGHT]]")
        images = Path(parts[1]) if len(parts) > 1 and parts[1] else None
        try:
            weight = float(parts[2]) if len(parts) > 2 else 1.0
        except ValueError:
            raise DataError(f"data source {spec!r}: weight {parts[2]!r} is not a number") from None
        return cls(Path(parts[0]), images, weight)

    @property
    def image_root(self) -> Path:
        return self.images if self.images is not None else self.annotations.parent


def registry_sources(name: str, root: str | Path, stage: str) -> list[DataSource]:
    """A registered dataset (e.g. `llava-v15`) under a data root, for a stage ("full" trains on the
    finetune data, as Cobra's full-finetune does)."""
    annotations, images = dataset_paths(name, root, "align" if stage == "align" else "finetune")
    return [DataSource(annotations, images)]


@dataclass
class TrainingData:
    examples: list[Encoded]  # `image` is a full path
    lengths: list[int]  # positions per example, image included
    problems: list[Problem]  # every sample left out, with why

    @property
    def has_image(self) -> list[bool]:
        return [ex.image is not None for ex in self.examples]


def load_training_data(
    sources: list[DataSource],
    vlm,
    stage: str,
    seed: int = 0,
    skip_bad: bool = False,
    verify_images: bool = False,
) -> TrainingData:
    """Reads, checks and encodes every source (`verify_images` decodes each image up front; otherwise
    only their existence is checked and a corrupt file fails when it is loaded, naming its sample)."""
    if not sources:
        raise DataError("no training data: give a dataset id with a data root, or data files")
    rng = random.Random(seed)
    per_image = image_tokens(vlm) or 0
    builder = vlm.get_prompt_builder
    examples, lengths, problems = [], [], []
    for source in sources:
        if source.weight < 0:
            raise DataError(f"{source.annotations}: a weight must be ≥ 0, got {source.weight}")
        if not source.annotations.is_file():
            raise DataError(f"{source.annotations}: no such annotation file")
        samples, bad = read_llava(source.annotations)
        good, more = check_samples(samples, source.image_root, vlm, stage, verify_images)
        problems += [Problem(f"{source.annotations.name}:{p.id}", p.reason) for p in bad + more]
        encoded = []
        for sample in good:
            if stage == "align":
                ex = encode_align(sample, vlm.tokenizer)
            else:
                ex = encode_finetune(
                    sample, vlm.tokenizer, builder(), vlm.config.image_placement, vlm.config.image_wrap
                )
            if ex.image is not None:
                ex = replace(ex, image=str(source.image_root / ex.image))
            encoded.append(ex)
        whole, part = divmod(source.weight, 1.0)
        chosen = encoded * int(whole) + rng.sample(encoded, round(part * len(encoded)))
        examples += chosen
        lengths += [len(ex.input_ids) + (per_image if ex.image is not None else 0) for ex in chosen]
    if problems and not skip_bad:
        shown = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(
            f"{len(problems)} samples cannot be used:\n{shown}{more}\n"
            "fix them, or pass --skip-bad to train without them (they are listed in the run dir)"
        )
    if not examples:
        raise DataError("no usable training samples are left")
    return TrainingData(examples, lengths, problems)
