"""SSM language models: Mamba-1, FalconMamba, Mamba-2 and the Jamba hybrid, in pure PyTorch, with a
recurrent state that makes each decoded token O(1)."""

from mambavl.lm.config import LMConfig, pad_vocab
from mambavl.lm.load import load_lm
from mambavl.lm.model import LanguageModel
from mambavl.lm.state import LMState

__all__ = ["LMConfig", "LMState", "LanguageModel", "load_lm", "pad_vocab"]
