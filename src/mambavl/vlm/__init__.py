"""The VLM: vision → projector → spliced into the LM's embeddings; prompt formats; sequences."""

from mambavl.vlm.prompts import PROMPT_FORMATS, PromptBuilder, PromptFormat, prompt_format_for
from mambavl.vlm.sequence import IGNORE_INDEX, MultimodalBatch, pack, splice, splice_image_first

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_FORMATS",
    "MultimodalBatch",
    "PromptBuilder",
    "PromptFormat",
    "pack",
    "prompt_format_for",
    "splice",
    "splice_image_first",
]
