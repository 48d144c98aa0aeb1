"""The playground page at / in a real headless browser (Debian's chromium, driven through chromedriver's
W3C WebDriver HTTP API with httpx — no extra package): it fills the adapter picker from /v1/models,
streams a completion into the page and shows its latency. A screenshot is kept in test-artifacts/."""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1000,900"]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    (CHROMIUM is None or CHROMEDRIVER is None) and not os.environ.get("CI"),
    reason="chromium/chromedriver not installed (.ci/run installs them)")]


class Browser:
    """One headless chromium session through chromedriver (W3C WebDriver over HTTP)."""

    def __init__(self, profile: Path) -> None:
        assert CHROMIUM and CHROMEDRIVER, "apt-get install -y chromium chromium-driver"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.http.get("/status").json()["value"]["ready"]:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "chromedriver did not start"
            time.sleep(0.1)
        options = {"binary": CHROMIUM, "args": [*FLAGS, f"--user-data-dir={profile}"]}
        created = self.http.post("/session", json={"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options}}}).json()["value"]
        assert "sessionId" in created, created
        self.session = f"/session/{created['sessionId']}"

    def go(self, url: str) -> None:
        self.http.post(f"{self.session}/url", json={"url": url}).raise_for_status()

    def script(self, source: str) -> Any:
        return self.http.post(f"{self.session}/execute/sync", json={"script": source, "args": []}).json()["value"]

    def wait_for(self, source: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := self.script(source)):
            assert time.monotonic() < deadline, f"timed out waiting for {source}"
            time.sleep(0.1)
        return value

    def screenshot(self, path: Path) -> None:
        png = self.http.get(f"{self.session}/screenshot").json()["value"]
        path.write_bytes(base64.b64decode(png))

    def close(self) -> None:
        try:
            self.http.delete(self.session)
        finally:
            self.http.close()
            self.driver.terminate()
            self.driver.wait(timeout=30)


@pytest.fixture(scope="module")
def open_server(serve_dirs: tuple[Path, Path], http_root: Path) -> Iterator[Any]:
    from lorakit.serve.options import ServeOptions, build
    from lorakit.serve.server import ServerThread

    app, _ = build(ServeOptions(model=serve_dirs[0], adapter_dirs=[http_root], port=0))
    with ServerThread(app) as thread:
        yield thread


def test_playground_streams_a_completion_in_a_real_browser(open_server: Any, tmp_path: Path) -> None:
    page = httpx.get(f"{open_server.url}/", timeout=30)
    assert page.status_code == 200 and "<script>" in page.text
    assert not re.search(r"(src|href)=\"https?:|//cdn", page.text)  # no CDN: everything comes from the server
    expected = httpx.post(f"{open_server.url}/v1/completions", json={
        "model": "a1", "prompt": "Hello", "max_tokens": 16, "temperature": 0}, timeout=60).json()["choices"][0]["text"]
    browser = Browser(tmp_path / "profile")
    try:
        browser.go(f"{open_server.url}/")
        options = browser.wait_for("const o = [...document.querySelectorAll('#model option')].map(o => o.value);"
                                   "return o.length ? o : null;")
        assert options == ["tiny-llama", "a0", "a1", "a2"]
        browser.script("document.getElementById('model').value = 'a1';"
                       "document.getElementById('prompt').value = 'Hello';"
                       "document.getElementById('max_tokens').value = '16';"
                       "document.getElementById('run').click();")
        state = browser.wait_for("const s = document.body.dataset.state; return s === 'done' || s === 'error' ? s : null;")
        assert state == "done", browser.script("return document.getElementById('error').textContent")
        assert browser.script("return document.getElementById('output').textContent") == expected
        latency = browser.script("return document.getElementById('latency').textContent")
        assert re.fullmatch(r"TTFT \d+ ms, total \d+ ms", latency), latency
        ARTIFACTS.mkdir(exist_ok=True)
        browser.screenshot(ARTIFACTS / "playground.png")
    finally:
        browser.close()
    assert (ARTIFACTS / "playground.png").stat().st_size > 5000
