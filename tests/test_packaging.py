"""The installed package is complete and its command line works."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import rawcast.transports.cli as cli

ROOT = Path(__file__).resolve().parents[1]
RAWCAST = str(Path(sys.executable).with_name("rawcast"))


def test_every_subpackage_is_listed_in_pyproject() -> None:
    """Every folder holding __init__.py under the code folders is in the wheel's package list."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(meta["tool"]["setuptools"]["packages"])
    mapping = meta["tool"]["setuptools"]["package-dir"]
    found = set()
    for pkg, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    assert found == listed


def test_help_and_version() -> None:
    """`rawcast --help` lists the commands and `rawcast --version` prints the package version."""
    out = subprocess.run([RAWCAST, "--help"], capture_output=True, text=True, check=True)
    assert "serve" in out.stdout
    out = subprocess.run([RAWCAST, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith("rawcast 0.")


def test_bad_flag_exits_non_zero_with_one_line() -> None:
    """A wrong option value fails with argparse's usage error, not a traceback."""
    out = subprocess.run([RAWCAST, "--log-level", "loud", "serve"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "invalid choice" in out.stderr and "Traceback" not in out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_answers_health_checks(tmp_path: Path) -> None:
    """`rawcast serve` loads a checkpoint, listens on the port and answers health checks."""
    from tiny_model import tiny_model

    from rawcast.model.loader import save

    ckpt = save(tiny_model(), tmp_path / "ckpt")
    port = _free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [RAWCAST, "--log-format", "json", "serve", "--port", str(port), "--model", str(ckpt)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        body = b""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    body = r.read()
                    break
            except OSError:
                time.sleep(0.2)
        assert b'"ok"' in body
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # ready once the model is loaded
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                time.sleep(0.2)
        else:
            raise AssertionError("never became ready")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode in (0, -15)


def test_serve_without_a_model_fails_with_one_line(tmp_path: Path) -> None:
    """A missing checkpoint is exit code 2 with one line saying what to fix."""
    out = subprocess.run(
        [RAWCAST, "serve", "--model", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "checkpoint directory" in out.stderr


def test_no_command_prints_help() -> None:
    """Running without a command prints help and exits 2."""
    assert cli.main([]) == 2


def test_bundled_weights_resolve_to_real_files() -> None:
    """``rawcast train``/``--drafter`` write their default output to ``BUNDLED_DIR``, which
    must be where the files really are (an editable install links them from a build
    directory: writing there would leave the source tree's checkpoint unchanged)."""
    from rawcast.model.loader import BUNDLED, BUNDLED_DIR

    for name in BUNDLED:
        files = list((BUNDLED_DIR / name).iterdir())
        assert files and not any(f.is_symlink() for f in files), name
