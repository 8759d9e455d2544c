"""``rawcast narrate SOURCE``: scene captions for a camera, a network stream or a file.

SOURCE is a v4l2 device (``/dev/video0``), an RTSP/HTTP(S) URL, or a file
(``--realtime`` paces a file like a live source). A reader thread decodes it with
PyAV; the main thread feeds a session of an ``EngineCore`` (the server's engine, no
worker thread) with the caption task, and with ``--transcribe`` the source's audio too.

Live sources hand over only their newest frame (a slow engine skips frames instead of
captioning the past); files without ``--realtime`` are captioned at every cadence point.

Each final caption (and transcript) is one JSON line on stdout; ``--webhook URL``
POSTs each as JSON (a background thread with a bounded queue: a slow receiver loses
the oldest, counted), and ``--publish URL`` posts to a rawcast server's feed
(``POST /v1/feeds/NAME``), whose WebSocket clients (``/v1/feeds/NAME``) receive it.

A live source that drops is reopened with exponential backoff (1 s doubling to 30 s,
``--retries``, default unlimited); one that never opens is an error (exit 1, one line).
SIGINT/SIGTERM finish the current caption, print it and exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import av
import structlog

from rawcast.transports.runtime import (
    RuntimeLoadError,
    add_model_args,
    load_drafter,
    load_model,
    options,
)

log = structlog.get_logger(__name__)

EXIT_INPUT, EXIT_SOURCE = 2, 1
OPEN_TIMEOUT_S = 10.0
BACKOFF_START_S, BACKOFF_MAX_S = 1.0, 30.0


class NarrateError(Exception):
    def __init__(self, message: str, code: int = EXIT_SOURCE) -> None:
        super().__init__(message)
        self.code = code


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("narrate", help="caption a camera, RTSP/HTTP stream or file")
    p.add_argument("source", help="/dev/videoN, rtsp://..., http(s)://... or a file")
    p.add_argument("--realtime", action="store_true", help="pace a file like a live source")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between captions")
    p.add_argument("--transcribe", action="store_true", help="also transcribe the audio")
    p.add_argument("--webhook", action="append", default=[], help="POST each event here")
    p.add_argument("--publish", default=None, help="a rawcast server's /v1/feeds/NAME URL")
    p.add_argument("--api-key", default=None, help="for --publish (default: RAWCAST_API_KEY)")
    p.add_argument("--retries", type=int, default=-1, help="reconnects (-1: unlimited)")
    add_model_args(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    src = Source(args.source, realtime=args.realtime)
    try:
        src.check()
        with src.open() as c:  # a source that never opens fails before the model loads
            if not c.streams.video:
                raise NarrateError(f"{src.spec} has no video stream", EXIT_INPUT)
        model, backend = load_model(options(args))
        drafter = load_drafter(options(args), model)
    except RuntimeLoadError as e:
        print(f"rawcast narrate: {e}", file=sys.stderr)
        return EXIT_INPUT
    except NarrateError as e:
        print(f"rawcast narrate: {e}", file=sys.stderr)
        return e.code
    sinks: list[Sink] = [Sink(url) for url in args.webhook]
    if args.publish:
        key = args.api_key or os.environ.get("RAWCAST_API_KEY")
        sinks.append(Sink(args.publish, key))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def out(ev: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(ev, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        for s in sinks:
            s.send(ev)

    try:
        narrate(
            model, backend, src, out, args.interval, args.transcribe, args.retries, stop,
            drafter=drafter, warm_up=options(args).compile,
        )  # fmt: skip
    except NarrateError as e:
        print(f"rawcast narrate: {e}", file=sys.stderr)
        return e.code
    finally:
        for s in sinks:
            s.close()
    return 0


# --- the source ---------------------------------------------------------------------------


@dataclass
class Source:
    """What to open and how: a device, a URL or a file."""

    spec: str
    realtime: bool = False

    @property
    def kind(self) -> str:
        if self.spec.startswith("/dev/video"):
            return "device"
        if "://" in self.spec:
            return "url"
        return "file"

    @property
    def live(self) -> bool:
        return self.kind != "file" or self.realtime

    def check(self) -> None:
        if self.kind == "file" and not Path(self.spec).is_file():
            raise NarrateError(f"no such file: {self.spec}", EXIT_INPUT)

    def open(self) -> Any:
        try:
            if self.kind == "device":
                return av.open(self.spec, format="v4l2", timeout=OPEN_TIMEOUT_S)
            if self.spec.startswith("rtsp"):
                opts = {"rtsp_transport": "tcp"}
                return av.open(self.spec, options=opts, timeout=OPEN_TIMEOUT_S)
            return av.open(self.spec, timeout=OPEN_TIMEOUT_S)
        except (av.FFmpegError, OSError) as e:
            raise NarrateError(f"cannot open {self.spec}: {e}") from e


Item = tuple[str, Any, float]  # ("video" | "audio", frame, media time in seconds)


def read(src: Source, audio: bool, stop: threading.Event) -> Iterator[Item]:
    """Decoded frames of one connection, paced by media time for ``--realtime`` files."""
    with src.open() as c:
        video = c.streams.video[0] if c.streams.video else None
        sound = c.streams.audio[0] if audio and c.streams.audio else None
        if video is None and sound is None:
            raise NarrateError(f"{src.spec} has no video stream", EXIT_INPUT)
        t0 = float(c.start_time or 0) / 1_000_000
        wall0 = time.monotonic()
        for packet in c.demux(*[s for s in (video, sound) if s is not None]):
            if stop.is_set():
                return
            for frame in packet.decode():
                if frame.time is None:
                    continue
                t = max(0.0, float(frame.time) - t0)
                if src.realtime and src.kind == "file":
                    ahead = t - (time.monotonic() - wall0)
                    if ahead > 0 and stop.wait(ahead):
                        return
                kind = "video" if isinstance(frame, av.VideoFrame) else "audio"
                yield kind, frame, t


def reader(
    src: Source,
    audio: bool,
    retries: int,
    stop: threading.Event,
    put: Callable[[Item | Exception | None], None],
) -> None:
    """Thread body: read, reconnecting a live source with backoff; None at the end."""
    attempt, delay, ever_opened = 0, BACKOFF_START_S, False
    try:
        while not stop.is_set():
            try:
                for item in read(src, audio, stop):
                    ever_opened = True
                    attempt, delay = 0, BACKOFF_START_S
                    put(item)
                if not src.live or src.kind == "file":
                    break  # a file ends; a live source that ends is reconnected
                reason = "ended"
            except NarrateError as e:
                if not ever_opened:
                    raise
                reason = str(e)
            except av.FFmpegError as e:
                if not src.live:
                    raise NarrateError(f"cannot decode {src.spec}: {e}") from e
                reason = str(e)
            attempt += 1
            if 0 <= retries < attempt:
                raise NarrateError(f"{src.spec}: gave up after {retries} reconnects ({reason})")
            log.warning("narrate.reconnecting", source=src.spec, reason=reason, in_s=delay)
            if stop.wait(delay):
                break
            delay = min(BACKOFF_MAX_S, delay * 2)
    except Exception as e:
        put(e)
    finally:
        put(None)


# --- the engine side -----------------------------------------------------------------------


def narrate(
    model: Any,
    backend: Any,
    src: Source,
    out: Callable[[dict[str, Any]], None],
    interval: float = 2.0,
    transcribe: bool = False,
    retries: int = -1,
    stop: threading.Event | None = None,
    drafter: Any = None,
    warm_up: bool = False,
) -> None:
    """Caption ``src`` until it ends (or ``stop``); each final event goes to ``out``.

    ``drafter``: an MTP drafter for speculative decoding (``EngineCore(drafter=...)``).
    ``warm_up``: build a compiled step's graphs before the source is read
    (``EngineCore.warm_up``; with ``--compile``)."""
    from rawcast.pipeline.engine import EngineCore
    from rawcast.pipeline.media import ErrorEvent, TextEvent
    from rawcast.pipeline.session import SessionConfig, Tasks
    from rawcast.pipeline.vad import VadConfig
    from rawcast.transports.runtime import load_vad

    stop = stop or threading.Event()
    core = EngineCore(model, vad_model=load_vad(transcribe), backend=backend, drafter=drafter)
    if warm_up:
        core.warm_up()
    config = SessionConfig(
        tasks=Tasks(transcribe=transcribe, caption=True),
        caption_interval_s=interval,
        vad=VadConfig() if transcribe else None,
    )
    session = core.open(config)
    # live: the newest video frame wins; files: everything, in order (bounded)
    q: queue.Queue[Item | Exception | None] = queue.Queue(maxsize=64)
    latest: list[Item] = []
    lock = threading.Condition()

    def put(x: Item | Exception | None) -> None:
        if src.live and isinstance(x, tuple) and x[0] == "video":
            with lock:
                latest[:] = [x]
                lock.notify()
            return
        while not stop.is_set():  # once stopped, the consumer no longer reads
            try:
                q.put(x, timeout=0.1)
            except queue.Full:
                continue
            with lock:
                lock.notify()
            return

    t = threading.Thread(target=reader, args=(src, transcribe, retries, stop, put), daemon=True)
    t.start()
    source = src.spec

    def emit_finals() -> None:
        for ev in session.outbox:
            if isinstance(ev, TextEvent) and ev.final and ev.text.strip():
                out(
                    {
                        "type": "caption" if ev.task == "caption" else ev.task,
                        "source": source,
                        "time": round(ev.start, 3),
                        "end": round(ev.end, 3),
                        "text": ev.text.strip(),
                        "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    }
                )
            elif isinstance(ev, ErrorEvent) and ev.fatal:
                raise NarrateError(f"{source}: {ev.code}: {ev.message}")
        session.outbox.clear()

    failure: Exception | None = None
    try:
        done = False
        while not done and not stop.is_set():
            items: list[Item | Exception | None] = []
            with lock:
                if not latest and q.empty() and not core.has_work():
                    lock.wait(0.1)
                items.extend(latest)
                latest.clear()
            while True:
                try:
                    items.append(q.get_nowait())
                except queue.Empty:
                    break
            for it in items:
                if it is None:
                    done = True
                elif isinstance(it, Exception):
                    failure = it
                    done = True
                elif it[0] == "video":
                    session.push_image(it[1], it[2])
                else:
                    session.push_audio(it[1])
            if core.has_work():
                core.step()
            emit_finals()
        stop.set()
        session.flush()
        session.request_close()
        core.run_until_idle()
        emit_finals()
    finally:
        stop.set()
        t.join(timeout=5)
    if failure is not None:
        if isinstance(failure, NarrateError):
            raise failure
        raise NarrateError(f"{source}: {failure}")


# --- webhooks ---------------------------------------------------------------------------


class Sink:
    """POSTs events to a URL from a background thread; a slow receiver loses the oldest."""

    def __init__(self, url: str, api_key: str | None = None, maxsize: int = 100) -> None:
        if not url.startswith(("http://", "https://")):
            raise NarrateError(f"webhook URL must be http(s): {url}", EXIT_INPUT)
        self.url = url
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.q: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize)
        self.dropped = 0
        self.failed = 0
        self.thread = threading.Thread(target=self._run, daemon=True, name="rawcast-webhook")
        self.thread.start()

    def send(self, ev: dict[str, Any]) -> None:
        while True:
            try:
                self.q.put_nowait(ev)
                return
            except queue.Full:
                try:
                    self.q.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def close(self, timeout: float = 5.0) -> None:
        self.send_end()
        self.thread.join(timeout)

    def send_end(self) -> None:
        try:
            self.q.put(None, timeout=1.0)
        except queue.Full:
            pass

    def _run(self) -> None:
        while True:
            ev = self.q.get()
            if ev is None:
                return
            body = json.dumps(ev).encode()
            req = urllib.request.Request(self.url, body, self.headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=5.0) as r:
                    r.read()
            except (urllib.error.URLError, OSError) as e:
                self.failed += 1
                log.warning("narrate.webhook_failed", url=self.url, error=str(e))
