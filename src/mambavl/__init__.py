"""mambavl: multimodal LLMs on Mamba state-space language models."""

__version__ = "0.1.0"
