"""Run the app under uvicorn (websockets implementation) on one port."""

from __future__ import annotations

import uvicorn

from rawcast.transports.app import create_app
from rawcast.transports.settings import ServerSettings


def run_server(settings: ServerSettings) -> None:
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ws="websockets",
        log_config=None,
        ws_max_size=settings.max_message_bytes,
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)),
    )
