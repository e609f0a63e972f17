"""The seeds' Python API, so that a script written for Cobra or ML-Mamba runs once its import says mambavl
(`from cobra import load` -> `from mambavl import load`): `load` with their keywords, their registry
functions, and the two backbone objects their VLMs carry (`vlm.vision_backbone`, `vlm.llm_backbone`:
`mambavl.vlm.backbones`)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from mambavl.checkpoints.files import CheckpointError
from mambavl.checkpoints.vlm import load as load_checkpoint
from mambavl.checkpoints.vlm import save_pretrained
from mambavl.presets import HUB_MODELS, PRESETS, RELEASES, is_tiny
from mambavl.vlm.backbones import Backbone, LLMBackbone, VisionBackbone, llm_backbone_id
from mambavl.vlm.model import VLM, create

__all__ = [
    "Backbone",
    "LLMBackbone",
    "VisionBackbone",
    "available_model_names",
    "available_models",
    "convert",
    "get_model_description",
    "llm_backbone_id",
    "load",
]

# The registries' display names -> preset ids ("Cobra-DINOSigLIP 3B" -> "cobra+3b")
DISPLAY_NAMES = {release.display_name: name for name, release in RELEASES.items()}


# ---- loading ---------------------------------------------------------------------------------------------
def load(
    model_id_or_path: str | Path,
    dtype: torch.dtype | None = None,
    device=None,
    pretrained_tower: bool = True,
    *,
    hf_token: str | None = None,
    cache_dir: str | Path | None = None,
    load_for_training: bool = False,
) -> VLM:
    """A VLM from a model directory (ours, a Cobra / ML-Mamba run directory, a Viper checkpoint) or a name.

    - A preset with released weights (`available_models()`, or a name of `available_model_names()`) is
      read from the Hugging Face cache, else downloaded; `hf_token` and `cache_dir` go to that download,
      as the seeds pass them.
    - A tiny preset (`tiny-cobra`, ...) has no released weights: it is built with random weights, as
      `mambavl.create` builds it, and a warning says so.
    - `load_for_training=True` returns the model in training mode (otherwise eval mode); no weight is
      frozen either way.

    On `device` (default: the CPU), in `dtype` (default: as stored).
    """
    name = DISPLAY_NAMES.get(str(model_id_or_path), model_id_or_path)
    if Path(name).expanduser().is_dir() or name in available_models() or name in HUB_MODELS:
        hub = {
            key: value for key, value in (("token", hf_token), ("cache_dir", cache_dir)) if value is not None
        }
        vlm = load_checkpoint(name, dtype, device, pretrained_tower, **hub)
    elif is_tiny(str(name)):
        warnings.warn(
            f"{name} is a tiny preset and has no released weights: built with random weights (as "
            "mambavl.create does), so its answers are noise. Train it (mambavl demo, mambavl train) and "
            "load the saved model directory for real answers.",
            stacklevel=2,
        )
        vlm = create(str(name), device=device, dtype=dtype)
    else:
        tiny = [p for p in PRESETS if is_tiny(p)]
        raise CheckpointError(
            f"{name}: neither a model directory nor a preset that load can build (released weights: "
            f"{', '.join(available_models())}; read from their hub files: {', '.join(HUB_MODELS)}; tiny "
            f"presets, random weights: {', '.join(tiny)}). Pass a "
            "model directory, or build any preset with random weights with mambavl.create(name)."
        )
    return vlm.train(load_for_training)


def convert(source: str | Path, destination: str | Path) -> Path:
    """A model `load` reads (an original checkpoint, a preset) -> mambavl's own layout in `destination`."""
    return save_pretrained(load(source), destination)


# ---- the seeds' registry functions -----------------------------------------------------------------------
def available_models() -> list[str]:
    """The presets whose released weights `load` fetches by name (the seeds' `available_models`); tiny
    presets load too, with random weights."""
    return [name for name, cfg in PRESETS.items() if cfg.hub_layout]


def available_model_names() -> list[str]:
    """Every name `load` fetches released weights by: each id, then its display name. (The seeds return
    (name, registry entry) pairs here despite the function's name; `get_model_description` gives the
    entry.)"""
    return [n for name in available_models() for n in (name, RELEASES[name].display_name)]


def get_model_description(model_id_or_name: str) -> dict:
    """What a model is: printed as JSON and returned, as the seeds do. Released models carry their
    registry's fields (name, optimization_procedure, visual_representation, image_processing,
    language_model, datasets, train_epochs); every preset also says what it is built from."""
    name = DISPLAY_NAMES.get(model_id_or_name, model_id_or_name)
    if name not in PRESETS:
        raise ValueError(
            f"{model_id_or_name!r} is not a model name: use a preset ({', '.join(PRESETS)}) or a display "
            f"name ({', '.join(DISPLAY_NAMES)}); mambavl.available_model_names() lists those with weights"
        )
    cfg = PRESETS[name]
    release = RELEASES.get(name)
    description = (release.description if release else {"name": name}) | {
        "model_id": name,
        "vision_backbone_id": cfg.tower,
        "image_resize_strategy": cfg.resize,
        "projector": cfg.projector,
        "llm_backbone_id": llm_backbone_id(cfg),
        "released_weights": cfg.hub_id,  # None: a tiny preset (random weights) or no layout load fetches
    }
    print(json.dumps(description, indent=2))
    return description
