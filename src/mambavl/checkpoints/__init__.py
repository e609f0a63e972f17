"""Checkpoint layouts: the original formats of the seed systems and of their language models, read into
mambavl's modules; file discovery and hub resolution."""

from mambavl.checkpoints.files import CheckpointError, read_state_dict, resolve_model_dir
from mambavl.checkpoints.lm_layouts import lm_config_from_json

__all__ = ["CheckpointError", "lm_config_from_json", "read_state_dict", "resolve_model_dir"]
