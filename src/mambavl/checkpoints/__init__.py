"""Checkpoint layouts: the original formats of the seed systems and of their language models, read into
mambavl's modules (`mambavl.lm.layouts` for language models); file discovery and hub resolution (`files`)."""

from mambavl.checkpoints.files import CheckpointError, read_state_dict, resolve_model_dir

__all__ = ["CheckpointError", "read_state_dict", "resolve_model_dir"]
