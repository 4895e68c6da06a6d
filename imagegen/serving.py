"""Running the app under uvicorn with a drain on SIGTERM, and the optional ops port.

SIGTERM (or a first Ctrl-C) does not stop the listener: the replica turns not-ready, answers new
generation requests with 503 + Retry-After (a load balancer retries them elsewhere), lets accepted
work finish and finished async results be fetched, and then exits 0 — at the latest after
IMAGEGEN_DRAIN_SECONDS. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Iterator
from types import FrameType
from typing import Literal

import uvicorn
from fastapi import FastAPI

from imagegen.api.deps import Services
from imagegen.api.job_sharing import hand_back
from imagegen.main import create_app, create_ops_app
from imagegen.settings import Settings

log = logging.getLogger(__name__)
POLL_SECONDS = 0.2


def unfinished_work(services: Services) -> int:
    """Jobs still computing or releasing, plus finished async results nobody has fetched yet."""
    engine = services.engine
    busy = 0 if engine is None or engine.idle() else 1
    return busy + services.jobs.undelivered()


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, services: Services, drain_seconds: float) -> None:
        super().__init__(config)
        self.services = services
        self.drain_seconds = drain_seconds
        self.companions: list[uvicorn.Server] = []
        self._drain: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.services.draining or self._loop is None:  # a second signal, or one before start-up: go now
            self.force_exit = self.should_exit = True
            self.config.timeout_graceful_shutdown = 0  # do not wait for open connections either
            self._captured_signals.append(sig)  # re-raised after shutdown: the exit status says "killed"
            for other in self.companions:
                other.should_exit = True
            return
        self.services.draining = True
        self._loop.call_soon_threadsafe(self._start_drain, sig)

    def _start_drain(self, sig: int) -> None:
        self._drain = asyncio.ensure_future(self.drain(signal.Signals(sig).name))

    async def drain(self, why: str) -> None:
        deadline = time.monotonic() + self.drain_seconds
        log.info("%s: draining for up to %.0fs", why, self.drain_seconds, extra={"event": "drain_started"})
        if handed := await hand_back(self.services, running_too=False):  # queued async jobs: another replica's now
            log.warning("handed %d queued jobs back to the other replicas", handed)
        while unfinished_work(self.services) and time.monotonic() < deadline:
            await asyncio.sleep(POLL_SECONDS)
        if unfinished_work(self.services):
            log.warning("drain period over: cancelling the work left", extra={"event": "drain_done"})
            await hand_back(self.services, running_too=True)  # shared jobs run again elsewhere instead
            if self.services.engine is not None:
                self.services.engine.cancel_all()  # the engine stops at its next step instead of finishing
        else:
            log.info("drained", extra={"event": "drain_done"})
        # Responses already being written get the rest of the grace period (uvicorn waits for them).
        self.config.timeout_graceful_shutdown = max(1, int(deadline - time.monotonic()))
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        for other in self.companions:
            other.should_exit = True


class QuietServer(uvicorn.Server):
    """The ops-port server: signals belong to the main server, which stops this one when it is done."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serve(settings: Settings) -> None:
    app = create_app(settings)
    services: Services = app.state.services

    def config(asgi: FastAPI, port: int, lifespan: Literal["on", "off"]) -> uvicorn.Config:
        # Our middleware writes the access log, in the service's log format.
        return uvicorn.Config(
            asgi, host=settings.host, port=port, lifespan=lifespan, log_config=None, access_log=False,
            limit_concurrency=settings.http_max_connections,  # past it: 503 at once, not an unbounded backlog
            timeout_keep_alive=settings.http_keepalive_seconds,
            # behind a proxy: its X-Forwarded-Proto/For make result URLs and logs name what the client used
            proxy_headers=True, forwarded_allow_ips=settings.forwarded_allow_ips,
        )  # fmt: skip

    main = DrainingServer(config(app, settings.port, "on"), services, settings.drain_seconds)
    servers: list[uvicorn.Server] = [main]
    if settings.metrics_port is not None:
        ops = QuietServer(config(create_ops_app(services), settings.metrics_port, "off"))
        main.companions.append(ops)
        servers.append(ops)

    async def run_all() -> None:
        await asyncio.gather(*(s.serve() for s in servers))

    asyncio.run(run_all())
