"""pyimgano serve as a real process: ONNX runtime with torch blocked (the lean-install path),
the operator page in headless Chromium, and SIGTERM draining an in-flight request (exit 0)."""
from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
from pyimgano_core.deploy.onnx_export import export_onnx  # noqa: E402
from pyimgano_core.infer import load_model  # noqa: E402
from tests.browser import find_chromium, open_page  # noqa: E402
from tests.serve_helpers import tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "line-7-token"
# torch and torchvision cannot be imported in the server process: every attempt is recorded and fails
SERVER = """
import json, sys
attempts = []
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            attempts.append(name)
            raise ImportError(f"blocked for this test: {name}")
sys.meta_path.insert(0, Block())
from pyimgano_cli.app import main
sys.argv = ["pyimgano", "serve"] + sys.argv[1:]
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code or 0
print(json.dumps({"code": code, "torch_attempts": attempts,
                  "torch_loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))}), flush=True)
sys.exit(code)
"""


def get(url: str, token: str | None = TOKEN, data: bytes | None = None, ctype: str = "image/png", timeout: float = 30):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": ctype, **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_proc")
    model, good, bad = tiny_model(tmp)
    export_onnx(model)
    (tmp / "token").write_text(TOKEN)
    proc = subprocess.Popen([sys.executable, "-c", SERVER, "--model", str(model), "--runtime", "onnx", "--port", "0",
                             "--token-file", str(tmp / "token")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = ""
    for line in proc.stderr:  # "listening on http://127.0.0.1:PORT (...)"
        if "listening on" in line:
            break
    assert "listening on http://127.0.0.1:" in line, line + proc.stderr.read()
    base = line.split("listening on ")[1].split(" ")[0]
    deadline = time.monotonic() + 60
    while get(base + "/readyz")[0] != 200:
        assert time.monotonic() < deadline and proc.poll() is None, "server not ready in 60 s"
        time.sleep(0.05)
    yield proc, base, model, good, bad
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_onnx_server_scores_like_the_torch_inspector(server):
    proc, base, model, good, bad = server
    ref = load_model(model)
    for path, flagged in ((good, False), (bad, True)):
        status, r = get(base + "/v1/predict", data=path.read_bytes())
        assert status == 200 and r["is_anomalous"] is flagged
        assert abs(r["score"] - ref.predict(path).score) <= 1e-4 * abs(ref.predict(path).score)
    assert get(base + "/v1/models")[1]["models"][0]["runtime"] == "onnx"
    assert get(base + "/v1/predict", token=None, data=good.read_bytes())[0] == 401


PAGE_SCRIPT = """
(async () => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  for (let i = 0; i < 200 && !document.getElementById("model").options.length; i++) await sleep(50);
  const bytes = Uint8Array.from(atob("%s"), (c) => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], "bad_part.png", {type: "image/png"}));
  const input = document.getElementById("file");
  input.files = dt.files;
  input.dispatchEvent(new Event("change"));
  const img = document.getElementById("overlay"), verdict = document.getElementById("verdict");
  for (let i = 0; i < 600; i++) {
    const v = verdict.textContent;
    if (v === "error") break;
    if (v !== "no part yet" && img.complete && img.naturalWidth > 0 && document.getElementById("recent").textContent.includes("bad_part.png")) break;
    await sleep(50);
  }
  return {verdict: verdict.textContent, cls: verdict.className, overlay: [img.naturalWidth, img.naturalHeight],
          details: document.getElementById("details").textContent, status: document.getElementById("status").textContent,
          recent: [...document.querySelectorAll("#recent tr")].map((tr) => tr.textContent)};
})()
"""


def test_operator_page_in_headless_chromium(server):
    if find_chromium() is None:
        pytest.skip("Chromium not found (install the Debian package 'chromium', or set $CHROMIUM)")
    proc, base, model, good, bad = server
    page = open_page(f"{base}/#token={TOKEN}", script=PAGE_SCRIPT % base64.b64encode(bad.read_bytes()).decode(), timeout=60)
    r = page.script_result
    assert page.errors == [], page.errors
    assert r["verdict"] == "ANOMALOUS" and r["cls"] == "bad" and r["status"] == "", r
    assert r["overlay"][1] == 60 and r["overlay"][0] > 52  # the overlay (image + colour bar) was drawn
    expect = load_model(model).predict(bad)
    assert r["details"].startswith(f"bad_part.png: score {expect.score:.4g}"[:24]) and "52x60 px" in r["details"]
    assert any("bad_part.png" in row and "ANOMALOUS" in row for row in r["recent"])
    assert "ANOMALOUS" in page.text and "last results" in page.text and len(page.screenshot) > 1000


def test_sigterm_answers_the_request_in_flight_then_exits_0(server):
    proc, base, model, good, bad = server
    host, port = base.split("//")[1].split(":")
    data = good.read_bytes()
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head + data[: len(data) // 2])  # the request is in flight: half of its body sent
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        with pytest.raises(OSError):  # no new connections while draining
            socket.create_connection((host, int(port)), timeout=5).close()
        s.sendall(data[len(data) // 2 :])
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < int(reply.lower().split(b"content-length: ")[1].split(b"\r\n")[0]):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert body["is_anomalous"] is False and body["model"] == "widget"
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report == {"code": 0, "torch_attempts": [], "torch_loaded": []}  # served ONNX without ever importing torch
    assert "stopped: in-flight requests answered, queues drained" in err and "Traceback" not in err
