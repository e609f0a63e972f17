"""mambavl: multimodal LLMs on Mamba state-space language models."""

__version__ = "0.1.0"

from mambavl.presets import PRESETS, create
from mambavl.vlm.model import VLM, VLMConfig

__all__ = ["PRESETS", "VLM", "VLMConfig", "__version__", "create"]
