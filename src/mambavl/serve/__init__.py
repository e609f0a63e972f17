"""Serving: the engine (state slots, continuous batching), the OpenAI-compatible HTTP API and the web
chat page."""

from mambavl.engine.scheduler import Engine, EngineConfig
from mambavl.serve.api import ServeConfig, create_app
from mambavl.serve.images import ImagePolicy

__all__ = ["Engine", "EngineConfig", "ImagePolicy", "ServeConfig", "create_app"]
