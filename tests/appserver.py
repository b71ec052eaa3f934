"""Start the real app (``streamlit run app.py``) on a free loopback port for browser and load
tests, and launch Debian's Chromium through Playwright."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
OUTPUT = PROJECT_ROOT / "test-output"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium_path() -> str:
    for cand in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if cand and Path(cand).exists():
            return cand
    pytest.fail("Chromium is not installed (apt-get install chromium); .ci/run installs it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    def __init__(self, env: dict | None = None, args: list[str] | None = None,
                 port: int | None = None):
        self.port = port or free_port()
        self.args = list(args or [])  # extra `streamlit run` options, e.g. --secrets.files
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        OUTPUT.mkdir(exist_ok=True)
        self.log_path = OUTPUT / f"server-{self.port}.log"

    def start(self, timeout: float = 90) -> "AppServer":
        self.started_at = time.perf_counter()
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(self.port),
             "--server.address", "127.0.0.1", "--server.headless", "true",
             "--browser.gatherUsageStats", "false", *self.args],
            cwd=PROJECT_ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited early; see {self.log_path}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            time.sleep(0.3)
        raise RuntimeError("streamlit did not become healthy in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if hasattr(self, "_log"):
            self._log.close()


@contextlib.contextmanager
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


# ----------------------------------------------------------------------------- server memory

def verdict_alert(page, timeout_ms: int):
    """The main page's verdict alert (class and calibrated probability, or "Answer withheld"),
    once it is shown: the answer the user waits for."""
    alerts = page.locator('[data-testid="stAlert"]')
    v = alerts.filter(has_text="calibrated probability ·").or_(
        alerts.filter(has_text="Answer withheld")).first
    v.wait_for(timeout=timeout_ms)
    return v


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (via /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler(threading.Thread):
    """Samples the summed VmRSS of the server's process tree every 0.5 s."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kb = 0
        self.samples = 0
        self._halt = threading.Event()

    def rss_kb(self) -> int:
        return sum(status_kb(p, "VmRSS") for p in process_tree(self.pid))

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak_kb = max(self.peak_kb, self.rss_kb())
            self.samples += 1
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def run_pacs_study(page, app_url: str, patient_id: str, timeout: int) -> None:
    """On the PACS page in a Playwright ``page``: identifying tags shown, search by patient ID,
    pick the one study found and run it; returns once its results are on the page."""
    page.goto(app_url + "/PACS", timeout=timeout)
    page.get_by_text("Show identifying tags").click()  # the patient ID in the list, UIDs shown
    page.get_by_role("textbox", name="Patient ID").fill(patient_id)
    page.get_by_role("button", name="Search").click()
    page.get_by_text("Studies (1)").wait_for(timeout=timeout)
    page.locator('[data-testid="stMultiSelect"]').first.click()
    page.get_by_role("option").filter(has_text=patient_id).click()
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Run").click()
    page.get_by_text("Results:").first.wait_for(timeout=timeout)


def wait_for(check, timeout: float, what: str, every: float = 0.5):
    """``check()``'s first truthy value within ``timeout`` seconds, else an AssertionError naming
    ``what`` (the tests' and the benches' one polling loop)."""
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
