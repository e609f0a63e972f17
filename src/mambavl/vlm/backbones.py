"""A VLM's parts as the seeds' backbone objects show them (`vlm.vision_backbone`, `vlm.llm_backbone`):
scripts written for Cobra / ML-Mamba read `identifier`, `image_transform`, `llm`, `tokenizer` ..."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mambavl.presets import LLM_BACKBONES
from mambavl.vlm.config import VLMConfig

if TYPE_CHECKING:
    from mambavl.vlm.model import VLM


def llm_backbone_id(config: VLMConfig) -> str:
    """The seeds' `llm_backbone_id` of a model's LM ("mamba-2.8b-zephyr"); else its hub id or family."""
    for name, (lm, _, _) in LLM_BACKBONES.items():
        if lm == config.lm:
            return name
    return config.lm_hub_id or config.lm.family


class Backbone:
    """One part of a VLM under the seeds' attribute names (`identifier`, `half_precision_dtype`); all
    else is the part's own (`.to(...)`, `.parameters()`, `.requires_grad_(...)`, calling it)."""

    half_precision_dtype = torch.bfloat16  # the dtype the seeds run both backbones in

    def __init__(self, module: torch.nn.Module, identifier: str):
        self.module = module
        self.identifier = identifier

    def __getattr__(self, name: str):
        if name == "module":  # not set yet (copying an instance): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identifier!r})"


class VisionBackbone(Backbone):
    """`vlm.vision_backbone`: the vision tower, its image transform and sizes."""

    def __init__(self, vlm: VLM):
        super().__init__(vlm.vision, vlm.config.tower)
        self.image_resize_strategy = vlm.config.resize
        self.image_transform = vlm.image_transform
        self.default_image_size = vlm.vision.image_size

    def get_image_transform(self):
        return self.image_transform

    @property
    def default_image_resolution(self) -> tuple[int, int, int]:
        return (3, self.default_image_size, self.default_image_size)


class LLMBackbone(Backbone):
    """`vlm.llm_backbone`: the language model (`.llm`) and the tokenizer (mambavl's: `encode`/`decode`,
    not a transformers tokenizer)."""

    def __init__(self, vlm: VLM):
        super().__init__(vlm.lm, llm_backbone_id(vlm.config))
        self.llm = vlm.lm
        self.embed_dim = vlm.config.lm.d_model
        self.vlm = vlm

    @property
    def tokenizer(self):
        return self.vlm.tokenizer

    def get_tokenizer(self):
        return self.vlm.tokenizer

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm.embed(input_ids)
