"""``rawcast stream FILE --url ws://HOST:PORT/v1/realtime``: a media file to a live server.

Any file PyAV opens is decoded in a worker thread and sent in real time (paced by
its media time, ``--speed`` to change that) over the Realtime WebSocket protocol:
PCM16 24 kHz ``input_audio_buffer.append`` chunks of 100 ms (PyAV's
``AudioResampler``), and with ``--captions`` one video frame per second as a JPEG
``rawcast.input_image.append``. At the end of the file it sends
``rawcast.session.close`` and prints events until the server has sent the final
ones and closed. Output: ``text`` prints final transcripts, translations and
captions with their times; ``json`` prints every server event, one per line.
Failures (missing file, unreadable container, no audio, refused connection, wrong
API key, server error) print one line on stderr and exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import queue
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI

RATE = 24000
CHUNK_SAMPLES = RATE // 10  # 100 ms appends
FRAME_INTERVAL_S = 1.0
MAX_FRAME_WIDTH = 640
EXIT_INPUT, EXIT_CONNECT, EXIT_SERVER = 2, 3, 1


class StreamError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("stream", help="stream a media file in real time to a rawcast server")
    p.add_argument("file", help="any audio or video file PyAV can open")
    p.add_argument("--url", required=True, help="ws://HOST:PORT/v1/realtime")
    p.add_argument("--api-key", default=None, help="Bearer key (default: env RAWCAST_API_KEY)")
    p.add_argument("--translate", metavar="LANG", default=None, help="also translate into LANG")
    p.add_argument("--captions", action="store_true", help="send video frames, print captions")
    p.add_argument("--format", choices=["text", "json"], default="text", dest="output")
    p.add_argument("--speed", type=float, default=1.0, help="pacing factor (1.0: real time)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    import os

    key = args.api_key or os.environ.get("RAWCAST_API_KEY")
    try:
        probe(args.file)
        return asyncio.run(stream(args, key))
    except StreamError as e:
        print(f"rawcast stream: {e}", file=sys.stderr)
        return e.code


def probe(path: str) -> None:
    """Fail early, with one clear line, on a file we cannot stream."""
    if not Path(path).is_file():
        raise StreamError(f"no such file: {path}", EXIT_INPUT)
    try:
        with av.open(path) as c:
            if not c.streams.audio:
                raise StreamError(f"{path} has no audio stream", EXIT_INPUT)
    except av.FFmpegError as e:
        raise StreamError(f"cannot read {path}: {e}", EXIT_INPUT) from e


# --- the media side (a worker thread) ----------------------------------------------------------

Message = tuple[float, dict[str, Any]]  # (media time in seconds, client event)


def media_messages(path: str, captions: bool) -> Iterator[Message]:
    """Client events for the file, in media order (blocking: runs in a thread)."""
    with av.open(path) as c:
        audio = c.streams.audio[0]
        video = c.streams.video[0] if captions and c.streams.video else None
        streams = [s for s in (audio, video) if s is not None]
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        pending = np.zeros(0, np.int16)
        sent = 0
        next_frame = 0.0
        t0 = float(c.start_time or 0) / 1_000_000

        def chunks(final: bool) -> Iterator[Message]:
            nonlocal pending, sent
            while pending.size >= CHUNK_SAMPLES or (final and pending.size):
                part, pending = pending[:CHUNK_SAMPLES], pending[CHUNK_SAMPLES:]
                b64 = base64.b64encode(part.tobytes()).decode()
                yield sent / RATE, {"type": "input_audio_buffer.append", "audio": b64}
                sent += part.size

        for packet in c.demux(*streams):
            for frame in packet.decode():
                if isinstance(frame, av.AudioFrame):
                    got = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
                    pending = np.concatenate([pending, *got]).astype(np.int16)
                    yield from chunks(False)
                elif isinstance(frame, av.VideoFrame) and frame.time is not None:
                    t = max(0.0, frame.time - t0)
                    if t + 1e-6 < next_frame:
                        continue
                    next_frame = t + FRAME_INTERVAL_S
                    yield t, {"type": "rawcast.input_image.append", "image": _jpeg(frame),
                              "time_ms": round(t * 1000)}  # fmt: skip
        tail = [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
        pending = np.concatenate([pending, *tail]).astype(np.int16)
        yield from chunks(True)


def _jpeg(frame: av.VideoFrame) -> str:
    if frame.width > MAX_FRAME_WIDTH:
        h = max(2, round(frame.height * MAX_FRAME_WIDTH / frame.width) // 2 * 2)
        frame = frame.reformat(width=MAX_FRAME_WIDTH, height=h)
    buf = io.BytesIO()
    frame.to_image().save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode()


def _produce(path: str, captions: bool, q: queue.Queue[Message | Exception | None]) -> None:
    try:
        for m in media_messages(path, captions):
            q.put(m)
    except Exception as e:  # reported by the sender, on the main side
        q.put(e)
    q.put(None)


# --- the network side --------------------------------------------------------------------------


async def stream(args: argparse.Namespace, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        ws = await connect(args.url, additional_headers=headers, max_size=None, open_timeout=10)
    except InvalidStatus as e:
        raise StreamError(_refusal(e), EXIT_CONNECT) from e
    except (OSError, InvalidURI, TimeoutError) as e:
        raise StreamError(f"cannot connect to {args.url}: {e}", EXIT_CONNECT) from e
    async with ws:
        first = json.loads(await ws.recv())
        if first.get("type") != "session.created":
            raise StreamError(_error_line(first), EXIT_SERVER)
        _print(first, args.output)
        session: dict[str, Any] = {
            "type": "transcription",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE}}},
        }
        if args.translate or args.captions:
            session["rawcast"] = {"translate": args.translate, "captions": args.captions}
        await ws.send(json.dumps({"type": "session.update", "session": session}))
        reader = asyncio.create_task(_read(ws, args.output))
        try:
            await _send_media(ws, args)
            code = await reader
        finally:
            reader.cancel()
        return code


async def _send_media(ws: ClientConnection, args: argparse.Namespace) -> None:
    q: queue.Queue[Message | Exception | None] = queue.Queue(maxsize=64)
    threading.Thread(target=_produce, args=(args.file, args.captions, q), daemon=True).start()
    loop = asyncio.get_running_loop()
    start = loop.time()
    speed = max(args.speed, 1e-3)
    try:
        while (m := await asyncio.to_thread(q.get)) is not None:
            if isinstance(m, Exception):
                raise StreamError(f"cannot decode {args.file}: {m}", EXIT_INPUT)
            t, event = m
            delay = start + t / speed - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await ws.send(json.dumps(event))
        await ws.send(json.dumps({"type": "rawcast.session.close"}))
    except ConnectionClosed:
        return  # the reader reports why


async def _read(ws: ClientConnection, output: str) -> int:
    """Print events until the server closes; the exit code follows how it closed."""
    code = 0
    try:
        async for frame in ws:
            ev = json.loads(frame)
            _print(ev, output)
            if ev.get("type") == "error" and output == "text":
                print(f"rawcast stream: {_error_line(ev)}", file=sys.stderr)
            if ev.get("type") == "rawcast.session.closed":
                return code
    except ConnectionClosed:
        pass
    rcvd = ws.protocol.close_rcvd
    if rcvd is not None and rcvd.code not in (1000, 1001):
        print(f"rawcast stream: server closed the connection: {rcvd.code} {rcvd.reason}",
              file=sys.stderr)  # fmt: skip
        return EXIT_SERVER
    return code


def _print(ev: dict[str, Any], output: str) -> None:
    if output == "json":
        print(json.dumps(ev), flush=True)
        return
    kind = ev.get("type", "")
    if kind == "conversation.item.input_audio_transcription.completed":
        times = ev.get("rawcast") or {}
        line = ev.get("transcript", "")
    elif kind == "rawcast.translation.completed":
        times = ev
        line = f"({ev.get('language')}) {ev.get('text', '')}"
    elif kind == "rawcast.caption.completed":
        times = ev
        line = f"[caption] {ev.get('text', '')}"
    else:
        return
    span = f"{_clock(times.get('start_ms', 0))} --> {_clock(times.get('end_ms', 0))}"
    print(f"[{span}] {line}", flush=True)


def _clock(ms: int) -> str:
    s, ms = divmod(int(ms), 1000)
    m, s = divmod(s, 60)
    h, m = divmod(m, 60)
    return f"{h:02d}:{m:02d}:{s:02d}.{ms // 10:02d}"


def _error_line(ev: dict[str, Any]) -> str:
    err = ev.get("error") or {}
    return f"server error {err.get('code')}: {err.get('message')}"


def _refusal(e: InvalidStatus) -> str:
    status = e.response.status_code
    try:
        message = json.loads(e.response.body or b"{}")["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = (e.response.body or b"").decode(errors="replace").strip()[:200]
    what = "authentication failed" if status == 401 else "connection refused"
    return f"{what} (HTTP {status}): {message}"
