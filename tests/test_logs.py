"""Logging: JSON lines off a TTY, bound session ids, capture in tests."""

from __future__ import annotations

import json

import pytest
import structlog
from structlog.testing import capture_logs

from rawcast.pipeline.logs import configure_logging


@pytest.fixture(autouse=True)
def _reset() -> object:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def test_json_lines_carry_the_session_id(capsys: pytest.CaptureFixture[str]) -> None:
    """With --log-format json every line is a JSON object with the bound session_id."""
    configure_logging("info", "json")
    structlog.contextvars.bind_contextvars(session_id="s-42")
    structlog.get_logger("t").info("session.opened", tasks=["transcribe"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    rec = json.loads(line)
    assert rec["event"] == "session.opened"
    assert rec["session_id"] == "s-42"
    assert rec["level"] == "info"
    assert "timestamp" in rec


def test_level_filters(capsys: pytest.CaptureFixture[str]) -> None:
    """Debug lines are dropped at info level."""
    configure_logging("info", "json")
    structlog.get_logger("t").debug("noisy")
    assert capsys.readouterr().err == ""


def test_unknown_level_is_refused() -> None:
    """A bad level is a clear error."""
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("loud", "json")


def test_capture_logs_in_tests() -> None:
    """structlog's capture_logs sees events with their bound fields."""
    with capture_logs() as logs:
        structlog.get_logger("t").warning("dropped", frames=3)
    assert logs == [{"event": "dropped", "frames": 3, "log_level": "warning"}]
