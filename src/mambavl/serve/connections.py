"""Connections to the server: deadlines on slow clients and a cap on open connections, added to uvicorn's
HTTP/1.1 protocol (h11 has no deadline of its own: a client that sends half a request line would hold its
connection forever). The deadline on a body the app reads is the app's (`api.Limits`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

if TYPE_CHECKING:
    from mambavl.serve.metrics import Metrics

# Set in the scope's state of a connection over the cap: the app answers its request with a 503 (as JSON,
# counted like every response) and closes it.
OVER_CAPACITY = "mambavl.over_capacity"


@dataclass(frozen=True)
class ConnectionLimits:
    # seconds from a connection's opening (or a new request's first byte on a kept-alive one) to the end of
    # the request's headers
    header_timeout: float = 10.0
    body_timeout: float = 30.0  # seconds from the end of the headers to the end of the body
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection is held open
    max_connections: int = 1000  # open at once; keep it under the process's open-file limit (ulimit -n)

    def __post_init__(self):
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {getattr(self, name)}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {self.max_connections}")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines on the client and a cap on open connections.

    Outside the app, a connection waits on its client in two phases, each with a deadline: the request's
    head (from the connection's opening, or from the first bytes of the next request on a kept-alive one)
    and the rest of a body the app refused (read and dropped, so that the client reads the answer rather
    than a reset connection). A body the app reads is under the app's own deadline (`api.Limits`)."""

    limits: ConnectionLimits = ConnectionLimits()
    metrics: Metrics | None = None
    _phase: str | None = None  # "headers" or "body": what the running deadline waits for
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._count_open()
        if len(self.connections) > self.limits.max_connections:
            self.app_state = {**self.app_state, OVER_CAPACITY: True}
        self._watch("headers")

    def connection_lost(self, exc) -> None:
        self._watch(None)
        super().connection_lost(exc)
        self._count_open()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch(self._waiting_on())

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Until the next request's first bytes, uvicorn's keep-alive timer runs instead of a head deadline.
        self._watch("body" if self._waiting_on() == "body" else None)

    def send_400_response(self, msg: str) -> None:  # a request h11 could not parse: counted like the app's
        if self.metrics is not None:
            self.metrics.http_responses.labels(route="other", status="400").inc()
        super().send_400_response(msg)

    def _waiting_on(self) -> str | None:
        state = self.conn.their_state
        if state is h11.IDLE:
            return "headers"
        if state is h11.SEND_BODY and self.cycle is not None and self.cycle.response_complete:
            return "body"
        return None

    def _watch(self, phase: str | None) -> None:
        """Runs the deadline of `phase` (None: none); one already running for it keeps running."""
        if phase == self._phase:
            return
        if self._deadline is not None:
            self._deadline.cancel()
        self._phase, self._deadline = phase, None
        if phase is not None and not self.transport.is_closing():
            seconds = self.limits.header_timeout if phase == "headers" else self.limits.body_timeout
            self._deadline = self.loop.call_later(seconds, self._too_slow, phase)

    def _too_slow(self, phase: str) -> None:
        self._phase, self._deadline = None, None
        if self._waiting_on() == phase and not self.transport.is_closing():
            if self.metrics is not None:
                self.metrics.client_timeouts.labels(phase=phase).inc()
            self.transport.close()

    def _count_open(self) -> None:
        if self.metrics is not None:
            self.metrics.connections.set(len(self.connections))


def uvicorn_config(
    app, limits: ConnectionLimits, metrics: Metrics | None = None, **options
) -> uvicorn.Config:
    """uvicorn's config for serving `app` with these limits (`options`: host, port, log_level, ...). The API
    has no WebSocket routes, so upgrades are not offered: every connection is one these limits cover."""
    protocol = type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits, "metrics": metrics})
    options = {"ws": "none", **options}
    return uvicorn.Config(app, http=protocol, timeout_keep_alive=limits.keep_alive_timeout, **options)
