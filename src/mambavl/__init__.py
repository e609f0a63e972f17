"""mambavl: multimodal LLMs on Mamba state-space language models.

import mambavl
vlm = mambavl.load("cobra+3b")            # a preset's released weights, a run dir, or our layout
# Scripts written for Cobra / ML-Mamba run once their import says mambavl (see `mambavl.compat`).
pb = vlm.get_prompt_builder(); pb.add_turn("human", "What is in this image?")
text = vlm.generate(image, pb.get_prompt(), max_new_tokens=256)
"""

__version__ = "0.1.0"

from mambavl.checkpoints.vlm import save_pretrained
from mambavl.compat import available_model_names, available_models, convert, get_model_description, load
from mambavl.presets import PRESETS
from mambavl.vlm.config import VLMConfig
from mambavl.vlm.model import VLM, create

__all__ = [
    "PRESETS",
    "VLM",
    "VLMConfig",
    "__version__",
    "available_model_names",
    "available_models",
    "convert",
    "create",
    "get_model_description",
    "load",
    "save_pretrained",
]
