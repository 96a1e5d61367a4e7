"""Drive the demo in a real browser: start `demo/app.py` in a subprocess, open it in headless Chromium (Playwright over
the system's `chromium`; Playwright's own browser downloads are not used) and run queries on the page.

Used by the browser tests (`tests/test_demo.py`) and by `demo/screenshot.py` (the screenshot and latency in docs/demo.md and docs/results.md).
Everything here is bounded in time: the server start, every page action, and `DemoServer.stop`, which ends the server's
whole process group.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


DEMO_DIR = Path(__file__).resolve().parent
APP = DEMO_DIR / "app.py"
# Headless, no GPU, nothing fetched in the background, a throw-away profile (Playwright's default temporary one).
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run",
]  # fmt: skip


def chromium_executable() -> str:
    """The system Chromium: `$MQIRTN_CHROMIUM`, else `/usr/bin/chromium`, else `chromium` on the PATH.

    Raises `FileNotFoundError` naming how to install it (the tests fail, never skip, without it).
    """
    candidates = [os.environ.get("MQIRTN_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        "no Chromium found (looked at $MQIRTN_CHROMIUM, /usr/bin/chromium and the PATH): install it with "
        "`apt-get install -y chromium` (scripts/test.sh does, as root) or point MQIRTN_CHROMIUM at one"
    )


def launch_browser(playwright):
    """Headless Chromium through Playwright (`playwright.sync_api.sync_playwright()` started by the caller)."""
    return playwright.chromium.launch(executable_path=chromium_executable(), args=CHROMIUM_ARGS, timeout=60_000)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DemoServer:
    """`python demo/app.py *args` on a free loopback port, in its own process group; a context manager.

    `start()` waits (at most `timeout` seconds) until the page answers; `stop()` sends SIGTERM to the process group,
    then SIGKILL after `grace` seconds. The server's output goes to `log_path`.
    """

    def __init__(
        self,
        args: list[str],
        log_path: str | os.PathLike,
        env: dict | None = None,
        timeout: float = 300.0,
        grace: float = 10.0,
        python: str = sys.executable,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.command = [python, str(APP), *args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path, self.env, self.timeout, self.grace = Path(log_path), env, timeout, grace
        self.process: subprocess.Popen | None = None

    def start(self) -> "DemoServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        try:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        finally:
            log.close()
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the demo exited with status {self.process.returncode}:\n{self.log()[-3000:]}")
            if self.answers():
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the demo did not answer at {self.url} within {self.timeout:.0f} s:\n{self.log()[-3000:]}")

    def answers(self, timeout: float = 5.0) -> bool:
        """Whether the page is served (HTTP 200) now."""
        try:
            with urllib.request.urlopen(self.url, timeout=timeout) as response:
                return response.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, self.grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> "DemoServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------------- the page
# Installed before each submission: notes when the loading indicators of the results and of the attention picture (its
# own event, after the results) appear and disappear, so that a query that returns the same page as the previous one
# is still seen to finish.
_WATCH_JS = """() => {
    window.__mqirtn = {t0: performance.now()};
    for (const id of ['results', 'attention']) {
        const tracker = document.querySelector(`#${id} [data-testid="status-tracker"]`);
        const state = window.__mqirtn[id] = {pending: false, settled: false};
        const observer = new MutationObserver(() => {
            const hidden = tracker.classList.contains('hide');
            if (!hidden) state.pending = true;
            else if (state.pending) { state.settled = true; observer.disconnect(); }
        });
        observer.observe(tracker, {attributes: true, attributeFilter: ['class']});
    }
}"""
# True (with the time) once the query settled and the page shows `count` loaded result images, or an error line.
_DONE_JS = """(count) => {
    const state = window.__mqirtn;
    if (!state || !state.results.settled) return false;
    const status = document.querySelector('#status').innerText;
    const images = [...document.querySelectorAll('#results .grid-container img')];
    const loaded = images.length === count && images.every((img) => img.complete && img.naturalWidth > 0);
    if (!loaded && !status.includes('Error')) return false;
    return performance.now() - state.t0;
}"""


def open_page(browser, url: str, timeout_ms: int = 60_000):
    """A new page at `url` (1280 px wide), loaded; every later action times out after `timeout_ms`."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(timeout_ms)
    page.goto(url, wait_until="networkidle")
    page.locator("#search").wait_for()
    return page


def set_query(page, image: str | os.PathLike | None, text: str, top_k: int) -> None:
    """Uploads `image` as the reference (None: keep the current one), types `text` and sets the top-k slider."""
    if image is not None:
        page.locator("#reference input[type=file]").set_input_files(str(image))
        page.locator("#reference img").first.wait_for(state="attached")
    page.locator("#query-text textarea").fill(text)
    number = page.locator("#top-k input[type=number]")
    number.fill(str(top_k))
    number.press("Enter")


def submit(page, expected: int, timeout_ms: int = 60_000) -> float:
    """Clicks Search and waits until the page shows `expected` result images (or an error line); returns the
    seconds from the click to then, measured in the page. The attention picture comes after: `wait_for_attention`."""
    page.evaluate(_WATCH_JS)
    page.locator("#search").click()
    handle = page.wait_for_function(_DONE_JS, arg=expected, polling="raf", timeout=timeout_ms)
    return float(handle.json_value()) / 1000.0


# True once the attention picture of the last submission is shown (or was cleared, for an invalid query).
_ATTENTION_JS = """() => {
    const state = window.__mqirtn;
    if (!state || !state.attention.settled) return false;
    const image = document.querySelector('#attention img');
    return !image || (image.complete && image.naturalWidth > 0);
}"""


def wait_for_attention(page, timeout_ms: int = 60_000) -> None:
    """Waits until the attention picture of the last `submit` is shown (it comes after the results)."""
    page.wait_for_function(_ATTENTION_JS, polling="raf", timeout=timeout_ms)


def result_captions(page) -> list[str]:
    """The captions of the results gallery, in page order (`#rank · score · id`)."""
    return page.locator("#results .grid-container .caption-label").all_inner_texts()


def status_text(page) -> str:
    return page.locator("#status").inner_text()
