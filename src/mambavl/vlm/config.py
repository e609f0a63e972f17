"""A VLM's configuration: which tower, projector and LM, how images are read and where they go, the
prompt format. Data only: presets are rows of it (`mambavl.presets`), checkpoints store it."""

from __future__ import annotations

from dataclasses import dataclass, field

from mambavl.lm.config import LMConfig
from mambavl.vision.images import DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class VLMConfig:
    name: str
    tower: str  # a name in mambavl.vision.TOWER_SETS
    projector: str  # a name in mambavl.projectors.PROJECTORS
    lm: LMConfig
    tokenizer: str  # a hub repo with tokenizer.json, or "bytes" (built in, offline)
    prompt_format: str = "zephyr"  # a name in mambavl.vlm.prompts.PROMPT_FORMATS
    projector_options: dict = field(default_factory=dict)
    tower_options: dict = field(default_factory=dict)  # a RADIO tower's sizes, as its checkpoint says them
    resize: str = "resize-naive"
    max_length: int = 2048  # image + text positions the model was trained on
    hub_id: str | None = None  # where the released weights live
    hub_layout: str | None = None  # their layout: "cobra" (run dir per model) or "mlmamba" (repo root)
    lm_hub_id: str | None = None  # the pretrained LM the seed started training from
    max_pixels: int = DEFAULT_MAX_PIXELS
    # LLaVA-style models (Viper)
    feature_layer: int | None = None  # tower block the features come from (None: the tower's default, -2)
    image_placement: str = "first"  # "first" (Cobra, ML-Mamba) or "placeholder": at `<image>` in the prompt
    anyres: tuple[tuple[int, int], ...] | None = None  # AnyRes grid pinpoints; None = one view
    image_newline: bool = False  # LLaVA-NeXT spatial_unpad: a learned embedding after every grid row
    image_wrap: tuple[str, str] | None = None  # text either side of the image (Nemotron: <img>, </img>)
    eos_token: str = "<|endoftext|>"  # the token that ends an answer
    system_prompt: str | None = None  # default system prompt of chat-template formats
    chat_template: str | None = None  # jinja template; None = the tokenizer repo's own (chat-template format)
