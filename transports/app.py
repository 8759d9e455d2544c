"""The ASGI app: every endpoint on one port.

``create_app(settings)`` loads the model and starts the engine in the lifespan
(or takes a ready ``Engine``, as tests do). Shared state lives in one
``AppState`` on ``app.state.rawcast``; per-connection state lives in the handlers.
Shutdown drains: ``/readyz`` turns unready, new sessions are refused, and open
sessions are finalised and closed within ``drain_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from rawcast.pipeline.engine import Engine, EngineConfig, SessionHandle
from rawcast.pipeline.vad import SileroModel
from rawcast.transports.metrics import Metrics
from rawcast.transports.security import AccessDenied, api_key, check_origin
from rawcast.transports.settings import ServerSettings

log = structlog.get_logger(__name__)


@dataclass
class AppState:
    settings: ServerSettings
    metrics: Metrics
    engine: Engine | None = None
    model_name: str = ""
    draining: bool = False
    sessions: set[SessionHandle] = field(default_factory=set)
    per_key: Counter[str] = field(default_factory=Counter)
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set when no session is open

    def authorize(self, headers: dict[str, str], query: dict[str, str]) -> str:
        """Check origin and API key; returns the key. Raises AccessDenied."""
        check_origin(self.settings, headers)
        return api_key(self.settings, headers, query)

    def admit(self, key: str) -> None:
        """Refuse a new session while draining or over the caller's quota."""
        if self.draining:
            raise AccessDenied(503, "server is draining; retry on another replica")
        limit = self.settings.max_sessions_per_key
        if limit and self.per_key[key] >= limit:
            raise AccessDenied(429, f"session limit of {limit} per API key reached")

    def track(self, key: str, h: SessionHandle) -> None:
        self.sessions.add(h)
        self.idle.clear()
        self.per_key[key] += 1
        self.metrics.active_sessions.set(len(self.sessions))

    def untrack(self, key: str, h: SessionHandle) -> None:
        if h in self.sessions:
            self.sessions.discard(h)
            self.per_key[key] -= 1
        if not self.sessions:
            self.idle.set()
        self.metrics.active_sessions.set(len(self.sessions))


def state(request: Request) -> AppState:
    st: AppState = request.app.state.rawcast
    return st


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    st = state(request)
    eng = st.engine
    if eng is None or st.draining:
        reason = "draining" if st.draining else "loading model"
        return JSONResponse({"ready": False, "reason": reason}, status_code=503)
    free = st.settings.max_sessions - eng.active_sessions
    body = {"ready": free > 0, "model": st.model_name, "sessions": eng.active_sessions,
            "capacity_left": max(0, free)}  # fmt: skip
    return JSONResponse(body, status_code=200 if free > 0 else 503)


async def metrics(request: Request) -> Response:
    st = state(request)
    try:
        st.authorize(dict(request.headers), dict(request.query_params))
    except AccessDenied as e:
        return JSONResponse({"error": {"message": e.message}}, status_code=e.status)
    return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def load_engine(settings: ServerSettings, metrics: Metrics) -> tuple[Engine, str]:
    from rawcast.transports.runtime import RuntimeOptions, load_drafter, load_model

    opts = RuntimeOptions(
        model=settings.model, device=settings.device, dtype=settings.dtype,
        backend=settings.backend, onnx_dir=settings.onnx_dir, threads=settings.threads,
        drafter=settings.drafter, compile=settings.compile,
    )  # fmt: skip
    model, backend = load_model(opts)
    drafter = load_drafter(opts, model)
    vad = SileroModel() if settings.vad else None
    config = EngineConfig(max_sessions=settings.max_sessions)
    engine = Engine(
        model, config, vad_model=vad, observer=metrics, backend=backend, drafter=drafter
    )
    if settings.compile:  # graphs built now, while /readyz says "loading model"
        t0 = time.perf_counter()
        ticks = engine.core.warm_up()
        log.info("engine.warmed_up", ticks=ticks, seconds=round(time.perf_counter() - t0, 1))
    return engine, settings.model


ROUTE_MODULES = (
    "rawcast.transports.realtime",
    "rawcast.transports.webrtc",
    "rawcast.transports.page",
    "rawcast.transports.feeds",
)


def transport_routes() -> list[BaseRoute]:
    """Routes of every transport module in this build (each has ``routes()``)."""
    out: list[BaseRoute] = []
    for name in ROUTE_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        out += mod.routes()
    return out


def create_app(
    settings: ServerSettings | None = None,
    engine: Engine | None = None,
    extra_routes: Callable[[], list[BaseRoute]] | None = None,
) -> Starlette:
    settings = settings or ServerSettings()
    st = AppState(settings=settings, metrics=Metrics(), engine=engine)
    if engine is not None:
        engine.core.observer = st.metrics
        st.model_name = "custom"

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        eng = st.engine
        if eng is None:
            eng, st.model_name = await asyncio.to_thread(load_engine, settings, st.metrics)
            st.engine = eng
        assert eng is not None
        await eng.start()
        log.info("server.ready", model=st.model_name, max_sessions=settings.max_sessions)
        try:
            yield
        finally:
            await drain(st)
            await eng.stop()

    routes: list[BaseRoute] = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
    ]
    routes += transport_routes()
    if extra_routes is not None:
        routes += extra_routes()
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.rawcast = st
    return app


async def drain(st: AppState) -> None:
    """Stop admitting, finalise and close open sessions within the drain deadline."""
    st.draining = True
    if st.engine is not None:
        st.engine.accepting = False
    handles = list(st.sessions)
    for h in handles:
        with contextlib.suppress(RuntimeError):
            h.close(graceful=True)
    if st.sessions:
        try:
            await asyncio.wait_for(st.idle.wait(), st.settings.drain_timeout_s)
        except TimeoutError:
            log.warning("drain.timeout", open_sessions=len(st.sessions))
