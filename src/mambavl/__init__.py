"""mambavl: multimodal LLMs on Mamba state-space language models.

import mambavl
vlm = mambavl.load("cobra+3b")            # a preset's released weights, a run dir, or our layout
pb = vlm.get_prompt_builder(); pb.add_turn("human", "What is in this image?")
text = vlm.generate(image, pb.get_prompt(), max_new_tokens=256)
"""

__version__ = "0.1.0"

from mambavl.checkpoints.vlm import convert, load, save_pretrained
from mambavl.presets import PRESETS, create
from mambavl.vlm.model import VLM, VLMConfig


def available_models() -> list[str]:
    """Presets whose released weights `load` can fetch (Cobra's `available_models()`)."""
    return [name for name, cfg in PRESETS.items() if cfg.hub_layout]


__all__ = [
    "PRESETS",
    "VLM",
    "VLMConfig",
    "__version__",
    "available_models",
    "convert",
    "create",
    "load",
    "save_pretrained",
]
