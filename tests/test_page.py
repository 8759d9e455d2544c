"""The browser page: served from the package, and live in headless Debian chromium."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_webrtc import Server, make_engine, run_server, write_wav

from rawcast.transports.settings import ServerSettings
from rawcast.transports.webrtc import calls_of

CHROMIUM = Path("/usr/bin/chromium")
KEY = "page-key"
SCREENSHOT = Path("/tmp/rawcast-page.png")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    settings = ServerSettings(api_keys=(KEY,), max_sessions=2, ice_servers=())
    with run_server(settings, make_engine(2)) as srv:
        yield srv


def test_page_and_its_files_are_served_with_content_types(server: Server) -> None:
    """GET / is the HTML page; its script and stylesheet come with their content types;
    unknown files are 404; /v1/config needs the API key and then gives the ICE servers."""
    with httpx.Client(base_url=server.url) as client:
        r = client.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert '<script src="/static/app.js"' in r.text and 'id="transcript"' in r.text
        r = client.get("/static/app.js")
        assert r.headers["content-type"].startswith("text/javascript")
        assert "oai-events" in r.text
        assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
        assert client.get("/static/../app.py").status_code == 404
        assert client.get("/static/nope.js").status_code == 404
        r = client.get("/v1/config")
        assert r.status_code == 401 and r.json()["auth_required"] is True
        r = client.get("/v1/config", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
        assert r.json()["ice_servers"] == [] and r.json()["default_language"] == "Spanish"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_page_in_chromium_shows_transcript_translation_and_captions(
    server: Server, tmp_path: Path
) -> None:
    """In headless chromium with a fake microphone (the fixture speech) and camera, the
    user enters the API key and clicks Start: the status turns live, a final transcript
    line, a translation and a scene caption appear; when the server ends the call, the page
    reconnects; changing the language reconfigures the session over the data channel; Stop
    ends the session on the server."""
    from playwright.sync_api import sync_playwright

    auth = {"Authorization": f"Bearer {KEY}"}
    wav = write_wav(tmp_path / "mic.wav", lead_s=0.5, tail_s=1.5)
    args = [
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(server.url + "/")
            page.fill("#api-key", KEY)
            page.click("#start")
            page.wait_for_selector("#status.live", timeout=30_000)
            page.wait_for_function(
                """() => [...document.querySelectorAll('#transcript .line.done .final')]
                       .some((e) => e.textContent.trim().length > 0)""",
                timeout=60_000,
            )
            page.wait_for_selector("#translation .line.done", timeout=30_000)
            page.wait_for_selector("#captions-list .caption", timeout=30_000)
            assert page.inner_text("#live-transcript").strip()

            # the server ends the call: the page reconnects by itself, as a new call
            calls = calls_of(server.app).calls
            (first,) = calls
            r = httpx.delete(f"{server.url}/v1/realtime/calls/{first}", headers=auth, timeout=30)
            assert r.status_code == 200
            page.wait_for_selector("#status.reconnecting", timeout=15_000)
            page.wait_for_selector("#status.live", timeout=30_000)
            (second,) = calls
            assert second != first

            page.select_option("#language", "German")
            call = calls[second]
            deadline = time.monotonic() + 10
            while call.proto.tasks().translate != "German":
                assert time.monotonic() < deadline, "the language change did not reach the server"
                time.sleep(0.05)
            page.screenshot(path=str(SCREENSHOT))

            page.click("#stop")
            deadline = time.monotonic() + 15
            while calls or server.engine.active_sessions:
                assert time.monotonic() < deadline, "Stop did not end the server session"
                time.sleep(0.05)
            assert page.inner_text("#status-text") == "idle"
        finally:
            browser.close()
