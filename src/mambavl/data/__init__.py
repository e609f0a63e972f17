"""Training data: LLaVA-format conversations, their tokenization with the seeds' label masking, named
datasets, and validation before training."""

from mambavl.data.check import check_file, check_samples
from mambavl.data.encode import Encoded, encode_align, encode_finetune
from mambavl.data.llava import Problem, Sample, read_llava
from mambavl.data.registry import DATASETS, dataset_paths

__all__ = [
    "DATASETS",
    "Encoded",
    "Problem",
    "Sample",
    "check_file",
    "check_samples",
    "dataset_paths",
    "encode_align",
    "encode_finetune",
    "read_llava",
]
