"""Event-stream responses that hold one of the process's stream slots (``StreamSlots``) while they are open."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class HeldSlotStream(StreamingResponse):
    """A stream that gives its slot back however it ends: finished, client gone, cancelled before its first
    event (a generator that never started runs no ``finally`` of its own)."""

    def __init__(self, body: AsyncIterator[str], release: Callable[[], None]) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()
