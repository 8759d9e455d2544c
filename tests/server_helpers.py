"""Run the rawcast app in-process on a free loopback port, for transport tests.

``serve(app)`` is a context manager: uvicorn runs in a background thread with its
own event loop (as in production, the engine and the handlers live on that loop),
bound to 127.0.0.1 on a port the OS picks; it yields the base URL
(``http://127.0.0.1:PORT``) and shuts the server down (lifespan drain included).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.applications import Starlette

from rawcast.transports.app import AppState


@contextmanager
def serve(app: Starlette, start_timeout_s: float = 60.0) -> Iterator[str]:
    """Serve ``app`` (from ``create_app``) on 127.0.0.1:<free port>; yield its base URL."""
    st: AppState = app.state.rawcast
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_config=None,
        lifespan="on",
        ws="websockets-sansio",  # the legacy "websockets" protocol warns (deprecated)
        ws_max_size=st.settings.max_message_bytes,
        timeout_graceful_shutdown=max(1, round(st.settings.drain_timeout_s)),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(start_timeout_s)
        sock.close()
