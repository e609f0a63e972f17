"""A server running in a thread of this process, on a free loopback port: for benchmarks and tests that
talk to the real HTTP server (uvicorn, exactly as `mambavl serve` runs it)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn

from mambavl.engine.scheduler import Engine
from mambavl.serve.api import ServeConfig, create_app
from mambavl.serve.connections import uvicorn_config


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """`with ServerThread(engine, config) as url:` serves at `url` until the block ends."""

    def __init__(self, engine: Engine, config: ServeConfig | None = None, startup_timeout: float = 600.0):
        self.engine = engine
        self.app = create_app(engine, config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout  # capturing CUDA graphs of a big model takes a while
        limits = (config or ServeConfig()).connections
        options = dict(host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(uvicorn_config(self.app, limits, engine.metrics, **options))
        self.thread = threading.Thread(target=self.server.run, name="mambavl-server", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline and self.thread.is_alive():
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"the server did not start within {self.startup_timeout:g} s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
