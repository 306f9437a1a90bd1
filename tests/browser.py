"""Open a page in real headless Chromium over the DevTools protocol (stdlib only).

Chromium is driven through ``--remote-debugging-pipe`` (commands on fd 3, replies and
events on fd 4, NUL-separated JSON), so no websocket library and no port are needed.
One session gives everything a report test wants: console messages and uncaught
exceptions (Runtime domain), browser-side errors such as failed image loads (Log domain),
the page text as rendered, and a full-page screenshot.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    """$CHROMIUM, else the first Chromium/Chrome on PATH, else None."""
    env = os.environ.get("CHROMIUM")
    if env and Path(env).is_file():
        return env
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageResult:
    text: str
    screenshot: bytes
    errors: list[str] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)
    script_result: object = None


class _Pipe:
    def __init__(self, write_fd: int, read_fd: int):
        self.w, self.r, self.buf, self.next_id, self.events = write_fd, read_fd, b"", 0, []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.r], [], [], left)[0]:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self.r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60.0) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        for i, ev in enumerate(self.events):
            if ev.get("method") == method:
                return self.events[i]
        while True:
            ev = self._read_message(deadline)
            self.events.append(ev)
            if ev.get("method") == method:
                return ev


def _errors(events: list[dict]) -> list[str]:
    out = []
    for ev in events:
        method, p = ev.get("method"), ev.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            e = p["entry"]
            out.append(f"log[{e.get('source')}]: {e.get('text')} {e.get('url', '')}".strip())
    return out


def open_page(url: str, width: int = 1366, height: int = 900, timeout: float = 90.0, script: str | None = None) -> PageResult:
    """Load ``url``; return its rendered text, a full-page PNG and every error it logged.

    ``script``: a JavaScript expression evaluated after the load (a promise is awaited) before
    the text is read; its value is returned as ``script_result`` (to drive a page's controls)."""
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium found (" + ", ".join(CANDIDATES) + " or $CHROMIUM)")
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()

    def wire():  # runs in the child before exec: DevTools wants fd 3 (in) and fd 4 (out)
        high_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)  # out of the way of 3 and 4 first
        high_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
        os.dup2(high_r, 3)
        os.dup2(high_w, 4)

    with tempfile.TemporaryDirectory(prefix="pyimgano-chromium-") as profile:
        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking", "--remote-debugging-pipe",
                f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"]
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=wire, close_fds=False)  # Python's own fds are non-inheritable
        os.close(to_child_r)
        os.close(from_child_w)
        pipe = _Pipe(to_child_w, from_child_r)
        try:
            target = pipe.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Page"):
                pipe.call(f"{domain}.enable", session=session)
            pipe.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                             "mobile": False}, session=session)
            pipe.events.clear()
            pipe.call("Page.navigate", {"url": url}, session=session)
            pipe.wait_event("Page.loadEventFired", timeout=timeout)
            result = None
            if script is not None:
                result = pipe.call("Runtime.evaluate", {"expression": script, "awaitPromise": True, "returnByValue": True},
                                   session=session, timeout=timeout)["result"].get("value")
            text = pipe.call("Runtime.evaluate", {"expression": "document.body.innerText", "returnByValue": True},
                             session=session)["result"].get("value", "")
            size = pipe.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
            full = (int(size["width"]), int(size["height"]))
            shot = pipe.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                        "clip": {"x": 0, "y": 0, "width": full[0], "height": full[1], "scale": 1}},
                             session=session, timeout=timeout)["data"]
            errors = _errors([e for e in pipe.events if e.get("sessionId") == session])
            try:
                pipe.call("Browser.close", timeout=10)
            except (RuntimeError, TimeoutError):
                pass
            return PageResult(text=text, screenshot=base64.b64decode(shot), errors=errors, size=full, script_result=result)
        finally:
            os.close(to_child_w)
            os.close(from_child_r)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

