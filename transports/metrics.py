"""Prometheus metrics, one registry per app (so tests can build several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rawcast.pipeline.engine import Observer


class Metrics(Observer):
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.active_sessions = Gauge("rawcast_active_sessions", "Open sessions", registry=r)
        self.step_seconds = Histogram(
            "rawcast_step_seconds", "Engine tick (one forward) latency", registry=r,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
        )  # fmt: skip
        self.batch_rows = Histogram(
            "rawcast_batch_rows", "Rows per forward", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )  # fmt: skip
        self.event_seconds = Histogram(
            "rawcast_event_latency_seconds",
            "Decode point (e.g. end of speech detected) to final text",
            ["task"], registry=r,
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0),
        )  # fmt: skip
        self.dropped_video = Counter(
            "rawcast_dropped_video_frames_total", "Video frames dropped by the cadence", registry=r
        )
        self.dropped_audio = Counter(
            "rawcast_dropped_audio_frames_total", "Audio frames dropped (engine behind)", registry=r
        )
        self.lagging_sessions = Gauge(
            "rawcast_lagging_sessions", "Sessions with over 1 s of audio queued", registry=r
        )
        self.errors = Counter("rawcast_errors_total", "Errors by kind", ["kind"], registry=r)

    def tick(self, rows: int, seconds: float) -> None:
        self.step_seconds.observe(seconds)
        self.batch_rows.observe(rows)

    def event_latency(self, task: str, seconds: float) -> None:
        self.event_seconds.labels(task=task).observe(seconds)

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()

    def dropped(self, kind: str, n: int) -> None:
        (self.dropped_video if kind == "video" else self.dropped_audio).inc(n)

    def lagging(self, sessions: int) -> None:
        self.lagging_sessions.set(sessions)
