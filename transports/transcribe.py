"""``rawcast transcribe FILE...``: captions for recordings, on the server's own engine.

Each file is demuxed and decoded with PyAV on this thread and fed, in media order, to a
session of an ``EngineCore`` (the engine the server runs, without its worker thread) by
``rawcast.pipeline.replay``: audio frames as they are (the session resamples and frames
them), and with ``--captions`` video frames at the session's caption cadence. The engine
is stepped whenever a second of audio is queued, so memory stays bounded for long files;
because the engine's output does not depend on how media is chunked or paced, the result
is the same as a live stream of the file.

Output (``--format``): ``text`` (one line per segment with times), ``json`` (one object
per file: segments with start/end, translation, captions), ``vtt`` and ``srt``
subtitles. ``-o`` writes to a file (one input) or a directory (several). Failures
(missing file, unreadable container, no audio stream, bad model) print one line on
stderr and exit 2 (input) or 1 (anything else).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import av

from rawcast.pipeline.replay import Caption, Segment, SessionFailedError, final_text, replay
from rawcast.transports.runtime import RuntimeLoadError, add_model_args, load_model, options

EXIT_INPUT, EXIT_FAIL = 2, 1
FORMATS = ("text", "json", "vtt", "srt")
EXTENSIONS = {"text": ".txt", "json": ".json", "vtt": ".vtt", "srt": ".srt"}
CAPTION_CUE_S = 2.0  # how long a scene caption stays up in subtitles (at most)


class TranscribeError(Exception):
    def __init__(self, message: str, code: int = EXIT_INPUT) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Transcript:
    file: str
    duration: float
    segments: list[Segment] = field(default_factory=list)
    captions: list[Caption] = field(default_factory=list)
    language: str | None = None  # translation target, if asked


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("transcribe", help="transcribe (translate, caption) media files")
    p.add_argument("files", nargs="+", metavar="FILE", help="anything PyAV opens")
    p.add_argument("--format", choices=FORMATS, default="text")
    p.add_argument("-o", "--output", default=None, help="file (one input) or directory")
    p.add_argument("--translate", metavar="LANG", default=None, help="also translate into LANG")
    p.add_argument("--captions", action="store_true", help="caption the video stream")
    p.add_argument("--no-vad", action="store_true", help="one segment per 30 s, no VAD")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(p)
    p.set_defaults(func=_main, default_log_level="warning")


def _main(args: argparse.Namespace) -> int:
    try:
        for f in args.files:
            probe(f)
        outputs = _outputs(args.files, args.output, args.format)
        model, backend = load_model(options(args))
        from rawcast.pipeline.engine import EngineCore
        from rawcast.transports.runtime import load_drafter, load_vad

        core = EngineCore(
            model, vad_model=load_vad(not args.no_vad), backend=backend,
            drafter=load_drafter(options(args), model),
        )  # fmt: skip
        for f, out in zip(args.files, outputs, strict=True):
            t = transcribe_file(core, f, args.translate, args.captions, not args.quiet)
            text = render(t, args.format)
            if out is None:
                sys.stdout.write(text)
                sys.stdout.flush()
            else:
                out.write_text(text, encoding="utf-8")
    except RuntimeLoadError as e:
        print(f"rawcast transcribe: {e}", file=sys.stderr)
        return EXIT_INPUT
    except TranscribeError as e:
        print(f"rawcast transcribe: {e}", file=sys.stderr)
        return e.code
    return 0


def probe(path: str) -> None:
    """One clear line for a file we cannot transcribe, before loading any model."""
    if not Path(path).is_file():
        raise TranscribeError(f"no such file: {path}")
    try:
        with av.open(path) as c:
            if not c.streams.audio:
                raise TranscribeError(f"{path} has no audio stream (for video only, use narrate)")
    except av.FFmpegError as e:
        raise TranscribeError(f"cannot read {path}: not a media file PyAV can open ({e})") from e


def _outputs(files: list[str], output: str | None, fmt: str) -> list[Path | None]:
    if output is None or output == "-":
        return [None] * len(files)
    out = Path(output)
    if len(files) == 1 and not out.is_dir():
        if not out.parent.is_dir():
            raise TranscribeError(f"cannot write {out}: no directory {out.parent}")
        return [out]
    if not out.is_dir():
        raise TranscribeError(f"-o {out}: with several files, -o must be an existing directory")
    stems = [Path(f).stem for f in files]
    names = stems if len(set(stems)) == len(stems) else [Path(f).name for f in files]
    return [out / (name + EXTENSIONS[fmt]) for name in names]


# --- feeding the engine ---------------------------------------------------------------


def transcribe_file(
    core: Any, path: str, translate: str | None, captions: bool, progress: bool = False
) -> Transcript:
    """Run one file through a session of ``core`` (an ``EngineCore``); its transcript."""
    from rawcast.pipeline.session import SessionConfig, Tasks

    config = SessionConfig(tasks=Tasks(transcribe=True, translate=translate, caption=captions))
    duration = _duration(path)
    bar = _bar(duration, path, progress)
    try:
        events = replay(core, _tracked(media(path, captions), bar), config)
        segments, caps = final_text(events)
    except av.FFmpegError as e:
        raise TranscribeError(f"cannot decode {path}: {e}", EXIT_FAIL) from e
    except SessionFailedError as e:
        raise TranscribeError(f"{path}: {e}", EXIT_FAIL) from e
    finally:
        if bar is not None:
            bar.close()
    return Transcript(path, round(duration, 3), segments, caps, language=translate)


def _tracked(items: Iterator[Any], bar: Any) -> Iterator[Any]:
    """``items``, moving the progress bar (if any) to each audio frame's time."""
    for item in items:
        if bar is not None and isinstance(item, av.AudioFrame) and item.time is not None:
            bar.update(max(0.0, item.time - bar.n))
        yield item


def media(path: str, captions: bool) -> Iterator[av.AudioFrame | tuple[av.VideoFrame, float]]:
    """Decoded audio frames, and (video frame, time) pairs with ``captions``, in media order."""
    with av.open(path) as c:
        audio = c.streams.audio[0]
        video = c.streams.video[0] if captions and c.streams.video else None
        if video is not None:
            video.thread_type = "AUTO"
        for packet in c.demux(*[s for s in (audio, video) if s is not None]):
            for frame in packet.decode():
                if isinstance(frame, av.AudioFrame):
                    yield frame
                elif isinstance(frame, av.VideoFrame) and frame.time is not None:
                    yield frame, float(frame.time)


def _duration(path: str) -> float:
    with av.open(path) as c:
        if c.duration is not None:
            return float(c.duration) / av.time_base
        s = c.streams.audio[0]
        return float(s.duration * s.time_base) if s.duration and s.time_base else 0.0


def _bar(duration: float, path: str, enabled: bool) -> Any:
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm  # type: ignore[import-untyped]

    return tqdm(total=round(duration, 1), unit="s", desc=Path(path).name, leave=False)


# --- output formats ---------------------------------------------------------------------


def render(t: Transcript, fmt: str) -> str:
    if fmt == "json":
        d = asdict(t)
        for seg in d["segments"]:
            if seg["translation"] is None:
                del seg["translation"]
        return json.dumps(d, ensure_ascii=False) + "\n"
    if fmt == "text":
        lines = []
        for seg in t.segments:
            lines.append(f"[{_clock(seg.start)} -> {_clock(seg.end)}] {seg.text}")
            if seg.translation is not None:
                lines.append(f"    ({t.language}) {seg.translation}")
        lines += [f"[{_clock(c.time)}] (scene) {c.text}" for c in t.captions]
        return "".join(line + "\n" for line in lines)
    return _subtitles(t, vtt=fmt == "vtt")


def _cues(t: Transcript) -> list[tuple[float, float, str]]:
    cues = []
    for seg in t.segments:
        lines = [x for x in (seg.text, seg.translation) if x]
        cues.append((seg.start, max(seg.end, seg.start + 0.001), "\n".join(lines)))
    for i, c in enumerate(t.captions):
        nxt = t.captions[i + 1].time if i + 1 < len(t.captions) else c.time + CAPTION_CUE_S
        end = min(c.time + CAPTION_CUE_S, max(nxt, c.time + 0.001))
        cues.append((c.time, end, f"[{c.text}]"))
    return sorted((c for c in cues if c[2].strip()), key=lambda c: (c[0], c[1]))


def _subtitles(t: Transcript, vtt: bool) -> str:
    out = ["WEBVTT\n\n"] if vtt else []
    for i, (start, end, text) in enumerate(_cues(t), 1):
        stamp = f"{_stamp(start, vtt)} --> {_stamp(end, vtt)}"
        # a blank line would end the cue early: keep cue text free of empty lines
        body = "\n".join(x for x in text.replace("-->", "->").splitlines() if x.strip())
        out.append(f"{i}\n{stamp}\n{body}\n\n")
    return "".join(out)


def _stamp(t: float, vtt: bool) -> str:
    ms = max(0, round(t * 1000))
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{'.' if vtt else ','}{ms:03d}"


def _clock(t: float) -> str:
    m, s = divmod(max(0.0, t), 60)
    return f"{int(m):02d}:{s:05.2f}"
