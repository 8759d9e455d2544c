"""Suite-wide guards."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

WEIGHTS = Path(__file__).resolve().parents[1] / "model" / "weights"


def _digests() -> dict[str, str]:
    return {
        str(p.relative_to(WEIGHTS)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(WEIGHTS.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session", autouse=True)
def bundled_weights_stay_put() -> Iterator[None]:
    """No test may write into the bundled checkpoints (a command run without ``--out``
    once overwrote rawcast-tiny's config.json): the suite fails at its end if one did."""
    before = _digests()
    yield
    after = _digests()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"tests changed the bundled weights: {', '.join(changed)}"
