"""Training: the seeds' two-stage recipe on LLaVA-format data, for 1…N processes (torchrun + FSDP2),
with atomic checkpoints and exact resume."""

from mambavl.train.config import STAGE_DEFAULTS, STAGES, LoraConfig, TrainConfig, read_config_file
from mambavl.train.trainer import RunDirError, TrainResult, train

__all__ = [
    "STAGES",
    "STAGE_DEFAULTS",
    "LoraConfig",
    "RunDirError",
    "TrainConfig",
    "TrainResult",
    "read_config_file",
    "train",
]
