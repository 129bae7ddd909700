"""/docs and /redoc work without the internet: every asset they load is served by the app.

Run: `HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/api/test_docs_offline.py`
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import threading
import time
from html.parser import HTMLParser

import httpx
import pytest
import uvicorn

from api.app import create_app
from schemas.settings import Settings
from tests.stack_process import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class References(HTMLParser):
    """Every URL a page loads by itself: script src, link href, img src."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "img") and a.get("src"):
            self.urls.append(a["src"])
        if tag == "link" and a.get("href"):
            self.urls.append(a["href"])
        if tag == "redoc" and a.get("spec-url"):
            self.urls.append(a["spec-url"])


def references(html: str) -> list[str]:
    parser = References()
    parser.feed(html)
    return parser.urls


@pytest.fixture
def app(tmp_path):
    return create_app(Settings(home=tmp_path / "home"))


EXPECTED_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_load_nothing_from_other_hosts(app, page):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as api:
        r = await api.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        # No absolute URL at all: a CDN (or Google Fonts) would leave the page blank offline.
        assert re.findall(r"https?://", r.text) == [], r.text
        urls = references(r.text)
        assets = [u for u in urls if not u.endswith("openapi.json")]
        assert {u.rsplit(".", 1)[-1] for u in assets} >= ({"js", "css", "png"} if page == "/docs" else {"js", "png"})
        if page == "/docs":
            assert "url: '/openapi.json'" in r.text
        else:
            assert "/openapi.json" in urls
        for url in assets:
            assert url.startswith("/"), url
            asset = await api.get(url)
            assert asset.status_code == 200, url
            ext = "." + url.rsplit(".", 1)[-1]
            assert EXPECTED_TYPES[ext] in asset.headers["content-type"], (url, asset.headers["content-type"])
            assert len(asset.content) > 1000, url  # the real bundle, not an error page
        assert (await api.get("/openapi.json")).json()["info"]["title"] == "LockN Tune"


def test_swagger_ui_renders_the_operations_in_a_browser_that_cannot_reach_any_other_host(tmp_path):
    assert CHROMIUM, "no chromium on this machine: `make test` installs Debian's chromium (make system-deps)"
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(Settings(home=tmp_path / "home")), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.1)
        with tempfile.TemporaryDirectory() as profile:
            dom = subprocess.run(
                [
                    CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}",
                    # Every host but this app fails to resolve: the page must render from the app alone.
                    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                    "--virtual-time-budget=15000", "--dump-dom", f"http://127.0.0.1:{port}/docs",
                ],
                capture_output=True, text=True, timeout=120,
            ).stdout
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    # Swagger UI rendered the spec: the operations of the runs and datasets routes are on the page.
    assert "opblock" in dom, dom[:2000]
    for path in ("/v1/runs", "/v1/datasets", "/v1/runs/{run_id}/cancel"):
        assert f'data-path="{path}"' in dom, path
