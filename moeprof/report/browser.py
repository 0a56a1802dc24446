"""A headless Chromium driven over the DevTools protocol on a pipe: load a report page, read it, screenshot it.

Standard library only (no websocket client, no Selenium, no Playwright): Chromium started with
`--remote-debugging-pipe` reads protocol messages on its fd 3 and writes them on fd 4, each a JSON text ended by
a NUL byte. Used by the report's browser test and its scale benchmark; a user can call it to check a page too:

    with Browser() as b:
        page = b.open("report.html")          # network off; waits for the page's `body[data-ready]`
        page.evaluate("window.moeprof.readyMs")
        page.screenshot_element("#heatmap", "heatmap.png")
        page.errors                            # console errors, uncaught exceptions, network requests tried

The browser is Debian's `chromium` (or `MOEPROF_CHROMIUM`), run with a fresh profile, no sandbox (root in CI),
no GPU, and no background networking.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
         "--disable-dev-shm-usage", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
         "--remote-debugging-pipe")


class BrowserError(RuntimeError):
    """The browser could not be found, started, or answered with an error."""


def find_browser() -> str | None:
    """Return the path of a Chromium to drive ($MOEPROF_CHROMIUM first), or None."""
    env = os.environ.get("MOEPROF_CHROMIUM")
    if env:
        return env if Path(env).exists() else shutil.which(env)
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _high_fd(fd: int) -> int:
    """Return a duplicate of `fd` numbered 10 or more (so dup2 onto 3 and 4 in the child cannot clobber it)."""
    import fcntl

    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


class Browser:
    """A headless Chromium process and its protocol pipe; use as a context manager."""

    def __init__(self, executable: str | None = None, *, width: int = 1400, height: int = 1000,
                 timeout_s: float = 60.0):
        exe = executable or find_browser()
        if not exe:
            raise BrowserError("no Chromium found: install Debian's `chromium` (apt-get install -y chromium) or set "
                               "MOEPROF_CHROMIUM to a Chrome/Chromium binary")
        self.timeout_s = timeout_s
        self._profile = tempfile.mkdtemp(prefix="moeprof-chromium-")
        to_child_r, to_child_w = (_high_fd(fd) for fd in os.pipe())
        from_child_r, from_child_w = (_high_fd(fd) for fd in os.pipe())

        def wire():  # in the child, after fork: its fd 3 reads our commands, its fd 4 writes replies
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        args = [exe, *FLAGS, f"--user-data-dir={self._profile}", f"--window-size={width},{height}", "about:blank"]
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, preexec_fn=wire, close_fds=False)
        os.close(to_child_r)
        os.close(from_child_w)
        self._out = os.fdopen(to_child_w, "wb", buffering=0)
        self._in = from_child_r
        self._next_id = 0
        self._replies: dict[int, queue.Queue] = {}
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._stderr: list[bytes] = []
        threading.Thread(target=lambda: self._stderr.extend(self._proc.stderr), daemon=True).start()
        self.send("Target.setDiscoverTargets", discover=True)

    @property
    def pid(self) -> int:
        """The browser's process id (its renderers are among its descendants)."""
        return self._proc.pid

    # -- the pipe

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._in, 1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                for q in list(self._replies.values()):
                    q.put({"error": {"message": "the browser closed its pipe"}})
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg and msg["id"] in self._replies:
                    self._replies[msg["id"]].put(msg)
                else:
                    self._events.put(msg)

    def send(self, method: str, session: str | None = None, **params) -> dict:
        """Send one protocol command and return its result (BrowserError for a protocol error or a timeout)."""
        with self._lock:
            self._next_id += 1
            mid = self._next_id
            self._replies[mid] = queue.Queue()
        msg = {"id": mid, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self._out.write(json.dumps(msg).encode() + b"\0")
        try:
            reply = self._replies[mid].get(timeout=self.timeout_s)
        except queue.Empty:
            raise BrowserError(f"{method}: no answer from the browser in {self.timeout_s:.0f} s") from None
        finally:
            self._replies.pop(mid, None)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def events(self) -> list[dict]:
        """Return (and forget) the protocol events received so far."""
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def wait_event(self, method: str, session: str, timeout_s: float, keep: list) -> dict:
        """Wait for event `method` of `session`; every event read meanwhile is appended to `keep`."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                ev = self._events.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                break
            keep.append(ev)
            if ev.get("method") == method and ev.get("sessionId") == session:
                return ev
        raise BrowserError(f"no {method} within {timeout_s:.0f} s")

    # -- pages

    def open(self, path: str | os.PathLike, *, ready: str = "document.body && document.body.dataset.ready === '1'",
             timeout_s: float | None = None, offline: bool = True) -> "Page":
        """Open a file in a new tab with the network off; wait until JavaScript `ready` is true; return the Page."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        page = Page(self, target, session)
        for domain in ("Page", "Runtime", "Log", "Network", "Performance"):
            self.send(f"{domain}.enable", session)
        if offline:
            self.send("Network.emulateNetworkConditions", session, offline=True, latency=0, downloadThroughput=-1,
                      uploadThroughput=-1)
        url = Path(path).resolve().as_uri()
        start = time.perf_counter()
        self.send("Page.navigate", session, url=url)
        page.wait_for(ready, timeout_s or self.timeout_s)
        page.load_s = time.perf_counter() - start
        return page

    def close(self) -> None:
        try:
            if self._proc.poll() is None:
                try:
                    self.send("Browser.close")
                except BrowserError:
                    pass
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
        finally:
            self._out.close()
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    """One tab: evaluate JavaScript, read what went wrong, take screenshots."""

    def __init__(self, browser: Browser, target: str, session: str):
        self.browser, self.target, self.session = browser, target, session
        self.log: list[dict] = []
        self.load_s = float("nan")

    def _collect(self) -> None:
        self.log += [e for e in self.browser.events() if e.get("sessionId") == self.session]

    def evaluate(self, expression: str, *, await_promise: bool = True) -> Any:
        """Return the JSON value of a JavaScript expression (BrowserError when it throws)."""
        r = self.browser.send("Runtime.evaluate", self.session, expression=expression, awaitPromise=await_promise,
                              returnByValue=True)
        self._collect()
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            text = d.get("exception", {}).get("description") or d.get("text")
            raise BrowserError(f"JavaScript error in {expression[:80]!r}: {text}")
        return r.get("result", {}).get("value")

    def metrics(self) -> dict[str, float]:
        """Return the renderer's counters since the page opened (`Performance.getMetrics`): e.g. TaskDuration, the
        wall seconds of its main thread's tasks (it grows with the machine's load like any wall time; for CPU time
        see benchmarks/report/scale.py)."""
        return {m["name"]: m["value"] for m in self.browser.send("Performance.getMetrics", self.session)["metrics"]}

    def wait_for(self, condition: str, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.evaluate(f"!!({condition})"):
                return
            time.sleep(0.05)
        raise BrowserError(f"the page did not become ready ({condition}) within {timeout_s:.0f} s; "
                           f"errors: {self.errors}")

    @property
    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions, failed loads and every request for a non-file URL, as text."""
        self._collect()
        out = []
        for e in self.log:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append("log: " + p["entry"].get("text", ""))
            elif m == "Network.requestWillBeSent":
                url = p.get("request", {}).get("url", "")
                if not url.startswith(("file:", "data:", "blob:", "about:")):
                    out.append("network request: " + url)
            elif m == "Network.loadingFailed" and not p.get("canceled"):
                out.append("load failed: " + p.get("errorText", ""))
        return out

    def screenshot_element(self, selector: str, path: str | os.PathLike, *, max_height: int = 4000) -> Path:
        """Write a PNG of the element `selector` (its full box, scrolled into view) and return its path."""
        box = self.evaluate(f"""(() => {{ const n = document.querySelector({json.dumps(selector)});
            if (!n) return null; const r = n.getBoundingClientRect();
            return {{x: r.left + window.scrollX, y: r.top + window.scrollY, w: r.width, h: r.height}}; }})()""")
        if box is None:
            raise BrowserError(f"no element {selector!r} on the page")
        clip = {"x": box["x"], "y": box["y"], "width": max(box["w"], 1), "height": min(max(box["h"], 1), max_height),
                "scale": 1}
        shot = self.browser.send("Page.captureScreenshot", self.session, format="png", clip=clip,
                                 captureBeyondViewport=True)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
