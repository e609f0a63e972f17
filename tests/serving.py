"""A real server for a test: `with LiveServer(vlm) as url:` (uvicorn in a thread, on a loopback port)."""

from __future__ import annotations

from mambavl.serve import Engine, EngineConfig, ServeConfig
from mambavl.serve.thread import ServerThread


class LiveServer(ServerThread):
    def __init__(self, vlm, engine: EngineConfig | None = None, config: ServeConfig | None = None):
        super().__init__(
            Engine(vlm, engine or EngineConfig(slots=8)),
            config or ServeConfig(model_name="test-model"),
            startup_timeout=60,
        )
