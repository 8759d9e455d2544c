"""Run the app under uvicorn (websockets implementation) on one port.

SIGTERM drains before uvicorn shuts down: ``/readyz`` turns unready at once, new
sessions are refused with a retry hint, and open sessions are finalised (their
last segment decoded and sent) and closed within ``drain_timeout_s``; only then
does uvicorn stop listening. A second SIGTERM, or SIGINT, stops at once.
"""

from __future__ import annotations

import asyncio
import signal
from types import FrameType

import structlog
import uvicorn

from rawcast.transports.app import AppState, create_app, drain
from rawcast.transports.settings import ServerSettings

log = structlog.get_logger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, st: AppState) -> None:
        super().__init__(config)
        self.st = st
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._drain_task is None and self._loop is not None:
            self.st.draining = True  # readiness flips before anything else
            log.info("server.draining", sessions=len(self.st.sessions))
            self._loop.call_soon_threadsafe(self._start_drain, sig, frame)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self, sig: int, frame: FrameType | None) -> None:
        async def run() -> None:
            try:
                await drain(self.st)
            finally:
                super(DrainingServer, self).handle_exit(sig, frame)

        self._drain_task = asyncio.get_running_loop().create_task(run())


SHUTDOWN_AFTER_DRAIN_S = 5


def run_server(settings: ServerSettings) -> None:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ws="websockets-sansio",
        log_config=None,
        ws_max_size=settings.max_message_bytes,
        # uvicorn's own wait comes AFTER our drain (which has its own deadline): keep it
        # short so that a stop takes about drain_timeout_s, not a multiple of it
        timeout_graceful_shutdown=SHUTDOWN_AFTER_DRAIN_S,
    )
    DrainingServer(config, app.state.rawcast).run()
