"""pyimgano serve, in-process: every endpoint with a tiny fitted model, auth, every malformed
input, overload, readiness, metrics, micro-batching and the request decoder."""
from __future__ import annotations

import base64
import struct
import threading
import time
import zlib

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from pyimgano_core.data.io import read_image  # noqa: E402
from pyimgano_core.infer import load_model  # noqa: E402
from pyimgano_core.serve import BatchSettings, DecodeLimits, HttpLimits, ServeOptions  # noqa: E402
from pyimgano_core.serve.batcher import MicroBatcher, Overloaded  # noqa: E402
from pyimgano_core.serve.decode import decode_image  # noqa: E402
from pyimgano_core.serve.server import build  # noqa: E402
from tests.serve_helpers import png_bytes, tiny_model  # noqa: E402

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    model, good, bad = tiny_model(tmp)
    token = tmp / "token"
    token.write_text(TOKEN + "\n")
    return tmp, model, good, bad, token


def start(client: TestClient, pool, timeout: float = 60.0) -> TestClient:
    assert pool.ready.wait(timeout), pool.failed
    return client


@pytest.fixture(scope="module")
def served(folders):
    tmp, model, good, bad, token = folders
    opts = ServeOptions([str(model), f"second={model}"], token_file=str(token), http=HttpLimits(max_body_bytes=200_000))
    app, pool = build(opts)
    with TestClient(app) as client:
        yield start(client, pool), folders


def png_header_only(w: int, h: int) -> bytes:
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = b"IDAT" + zlib.compress(b"\0" * 64)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
            + struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat)))


def test_predict_multipart_and_raw_equal_the_inspector(served):
    client, (tmp, model, good, bad, _) = served
    ref = load_model(model)
    for path in (good, bad):
        expect = ref.predict(path)
        data = path.read_bytes()
        a = client.post("/v1/predict", files={"image": (path.name, data, "image/png")}, headers=AUTH)
        b = client.post("/v1/predict", content=data, headers={**AUTH, "Content-Type": "image/png"})
        assert a.status_code == b.status_code == 200, a.text
        for r in (a.json(), b.json()):
            assert r["score"] == pytest.approx(expect.score, rel=1e-5) and r["is_anomalous"] == expect.is_anomalous
            assert r["threshold"] == ref.model.thresholds.image and r["model"] == "widget"
            assert (r["width"], r["height"]) == (52, 60) and r["latency_ms"] > 0
            assert r["defect_area_px"] == int(expect.mask.sum())
    assert client.post("/v1/predict", content=bad.read_bytes(), headers={**AUTH, "Content-Type": "image/png"}).json()["is_anomalous"] is True
    assert client.post("/v1/predict", content=good.read_bytes(), headers={**AUTH, "Content-Type": "image/png"}).json()["is_anomalous"] is False


def test_map_png_is_the_overlay_and_map_mask_the_mask(served):
    client, (tmp, model, good, bad, _) = served
    expect = load_model(model).predict(bad)
    r = client.post("/v1/predict?map=png", files={"image": ("bad.png", bad.read_bytes(), "image/png")}, headers=AUTH).json()
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(r["overlay_png"]), np.uint8), cv2.IMREAD_COLOR)
    assert overlay.shape[0] == 60 and overlay.shape[1] > 52  # the image, then the colour bar
    r = client.post("/v1/predict?map=mask", files={"image": ("bad.png", bad.read_bytes(), "image/png")}, headers=AUTH).json()
    mask = cv2.imdecode(np.frombuffer(base64.b64decode(r["mask_png"]), np.uint8), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(mask > 0, expect.mask)
    assert expect.mask.sum() > 0 and "overlay_png" not in r


def test_batch_scores_each_image_and_reports_the_bad_one(served):
    client, (tmp, model, good, bad, _) = served
    ref = load_model(model)
    files = [("image", ("good.png", good.read_bytes(), "image/png")), ("image", ("junk.txt", b"hello", "text/plain")),
             ("image", ("bad.png", bad.read_bytes(), "image/png"))]
    r = client.post("/v1/predict/batch?model=second", files=files, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "second" and body["n_images"] == 3 and body["n_failed"] == 1
    g, j, b = body["results"]
    assert g["score"] == pytest.approx(ref.predict(good).score, rel=1e-5) and g["is_anomalous"] is False
    assert b["score"] == pytest.approx(ref.predict(bad).score, rel=1e-5) and b["is_anomalous"] is True
    assert j == {"filename": "junk.txt", "error": "not an image: the bytes are not PNG, JPEG, BMP, TIFF or WebP",
                 "kind": "bad_image", "status": 400}
    r = client.post("/v1/predict/batch", files=[("image", ("x", b"", "image/png"))], headers=AUTH)
    assert r.status_code == 400 and "no image of the batch could be scored" in r.json()["error"]


def test_models_health_and_recent(served):
    client, (tmp, model, *_ ) = served
    r = client.get("/v1/models", headers=AUTH).json()
    assert r["default"] == "widget" and [m["name"] for m in r["models"]] == ["widget", "second"]
    assert r["models"][0]["runtime"] == "torch" and r["models"][0]["calibrated"] is True
    assert client.get("/healthz").json() == {"status": "ok"}  # no token needed
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == ["widget", "second"]
    recent = client.get("/v1/recent", headers=AUTH).json()["results"]
    assert len(recent) <= 20 and all({"time", "model", "score", "is_anomalous"} <= set(x) for x in recent)


def test_auth(served):
    client, (tmp, model, good, bad, _) = served
    data = good.read_bytes()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}):
        r = client.post("/v1/predict", content=data, headers={**headers, "Content-Type": "image/png"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json() == {"error": "missing or wrong token: send the header 'Authorization: Bearer <token>'", "kind": "unauthorized"}
    assert client.get("/metrics").status_code == 401 and client.get("/v1/models").status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200


MALFORMED = {  # name: (content type, body, status, message start)
    "not an image": ("image/png", b"GIF89a not really", 400, "not an image: the bytes are not PNG"),
    "truncated PNG": ("image/png", None, 400, "truncated PNG: the file ends before its last chunk"),
    "1x1 image": ("image/png", png_bytes(np.zeros((1, 1, 3), np.uint8)), 400, "image too small: 1x1"),
    "30000x30000 header": ("image/png", png_header_only(30000, 30000), 413, "image too large: the PNG header says 30000x30000 (900 MP)"),
    "empty body": ("image/png", b"", 400, "empty body: send the image bytes"),
    "wrong content type": ("application/json", b'{"image": 1}', 415, "Content-Type application/json: send multipart/form-data"),
    "no content type": (None, b"abc", 415, "Content-Type (none): send multipart/form-data"),
    "corrupt JPEG": ("image/jpeg", b"\xff\xd8\xff\xe0" + b"\x00" * 40 + b"\xff\xd9", 400, "not a readable JPEG image"),
    "body over the limit": ("image/png", b"\x89PNG\r\n\x1a\n" + b"\0" * 300_000, 413, "request body of 300008 bytes"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_is_a_4xx_with_one_message(served, case):
    client, (tmp, model, good, bad, _) = served
    ctype, body, status, message = MALFORMED[case]
    if body is None:
        data = good.read_bytes()
        body = data[: len(data) // 2]
    headers = dict(AUTH, **({"Content-Type": ctype} if ctype else {}))
    r = client.post("/v1/predict", content=body, headers=headers)
    assert r.status_code == status and r.json()["error"].startswith(message), r.text
    assert "\n" not in r.json()["error"] and "Traceback" not in r.text
    ok = client.post("/v1/predict", content=good.read_bytes(), headers={**AUTH, "Content-Type": "image/png"})
    assert ok.status_code == 200  # and the server keeps serving


def test_a_streamed_body_is_cut_at_the_limit(served):
    client, (tmp, model, good, bad, _) = served

    def chunks():  # no Content-Length: the limit applies while the body streams in
        for _ in range(30):
            yield b"\x89PNG\r\n\x1a\n" + b"0" * 10_000

    r = client.post("/v1/predict", content=chunks(), headers={**AUTH, "Content-Type": "image/png"})
    assert r.status_code == 413 and r.json() == {"error": "request body over 200000 bytes", "kind": "body_too_large"}


def test_other_client_errors(served):
    client, (tmp, model, good, bad, _) = served
    r = client.post("/v1/predict?model=nope", content=good.read_bytes(), headers={**AUTH, "Content-Type": "image/png"})
    assert r.status_code == 404 and r.json()["error"] == "unknown model 'nope'; this server has: widget, second"
    r = client.post("/v1/predict", files={"file": ("a.png", good.read_bytes(), "image/png")}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"] == "the multipart body has no file field named 'image'"
    r = client.post("/v1/predict?map=jpeg", content=good.read_bytes(), headers={**AUTH, "Content-Type": "image/png"})
    assert r.status_code == 400 and r.json()["error"] == "map='jpeg': use map=png (overlay) or map=mask"
    r = client.get("/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and r.json() == {"error": "no route GET /v1/nothing", "kind": "not_found"}


def test_metrics_count_requests_errors_and_flags(served):
    client, (tmp, model, good, bad, _) = served
    def value(text, name):
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))
    before = client.get("/metrics", headers=AUTH).text
    for path in (bad, bad, good):
        client.post("/v1/predict", content=path.read_bytes(), headers={**AUTH, "Content-Type": "image/png"})
    client.post("/v1/predict", content=b"nope", headers={**AUTH, "Content-Type": "image/png"})
    after = client.get("/metrics", headers=AUTH).text
    assert value(after, 'pyimgano_images_flagged_total{model="widget"}') - value(before, 'pyimgano_images_flagged_total{model="widget"}') == 2
    assert value(after, 'pyimgano_images_scored_total{model="widget"}') - value(before, 'pyimgano_images_scored_total{model="widget"}') == 3
    assert value(after, 'pyimgano_errors_total{kind="bad_image"}') - value(before, 'pyimgano_errors_total{kind="bad_image"}') == 1
    assert value(after, 'pyimgano_requests_total{code="200",route="/v1/predict"}') - value(before, 'pyimgano_requests_total{code="200",route="/v1/predict"}') == 3
    assert 'pyimgano_queue_depth{model="widget"} 0.0' in after and "pyimgano_ready 1.0" in after
    assert "pyimgano_request_latency_seconds_bucket{" in after and 'pyimgano_batch_size_count{model="widget"}' in after


def test_not_ready_then_ready(folders, monkeypatch):
    tmp, model, good, bad, _ = folders
    from pyimgano_core.serve import models as served_models

    gate = threading.Event()
    real = served_models.load_model
    monkeypatch.setattr(served_models, "load_model", lambda *a, **k: (gate.wait(30), real(*a, **k))[1])
    app, pool = build(ServeOptions([str(model)]))
    with TestClient(app) as client:
        r = client.post("/v1/predict", content=good.read_bytes(), headers={"Content-Type": "image/png"})
        assert r.status_code == 425 and r.headers["retry-after"] == "1"
        assert r.json()["error"] == "the models are still loading; retry when /readyz answers 200"
        assert client.get("/readyz").status_code == 503 and client.get("/healthz").status_code == 200
        gate.set()
        assert pool.ready.wait(60)
        assert client.get("/readyz").status_code == 200
        assert client.post("/v1/predict", content=good.read_bytes(), headers={"Content-Type": "image/png"}).status_code == 200


def test_full_queue_answers_503_with_retry_after(folders):
    tmp, model, good, bad, _ = folders
    app, pool = build(ServeOptions([str(model)], batching=BatchSettings(max_batch=1, max_queue=2)))
    with TestClient(app) as client:
        start(client, pool)
        m = pool.models["widget"]
        release, entered = threading.Event(), threading.Event()
        real = m.batcher.score

        def slow(images):
            entered.set()
            release.wait(30)
            return real(images)

        m.batcher.score = slow
        data = good.read_bytes()
        codes = []

        def call():
            codes.append(client.post("/v1/predict", content=data, headers={"Content-Type": "image/png"}).status_code)

        first = threading.Thread(target=call)
        first.start()
        assert entered.wait(30)  # the worker holds image 1; 2 more fill the queue
        queued = [threading.Thread(target=call) for _ in range(2)]
        for t in queued:
            t.start()
        deadline = time.monotonic() + 30
        while m.batcher.depth() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = client.post("/v1/predict", content=data, headers={"Content-Type": "image/png"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json() == {"error": "the queue is full (2 images waiting); retry shortly", "kind": "overloaded"}
        release.set()
        for t in [first, *queued]:
            t.join(30)
        assert sorted(codes) == [200, 200, 200]


def test_batcher_groups_waiting_requests_into_one_call():
    calls, release = [], threading.Event()

    def score(items):
        calls.append(list(items))
        if len(calls) == 1:
            release.wait(10)
        return [x * 10 if x != 3 else ValueError("bad item") for x in items]

    b = MicroBatcher(score, max_batch=4, max_wait_s=0.0, max_queue=5)
    futures = [b.submit(0)]
    while not calls:
        time.sleep(0.001)
    futures += [b.submit(i) for i in range(1, 6)]  # queued while the first call runs
    with pytest.raises(Overloaded, match="the queue is full"):
        b.submit(99)
    release.set()
    assert [f.result(10) for f in futures if f is not futures[3]] == [0, 10, 20, 40, 50]
    with pytest.raises(ValueError, match="bad item"):
        futures[3].result()
    assert calls == [[0], [1, 2, 3, 4], [5]]  # bounded batches, arrival order
    b.close(10)
    with pytest.raises(Overloaded, match="shutting down"):
        b.submit(1)


def test_batcher_waits_only_for_announced_images():
    calls = []
    b = MicroBatcher(lambda items: calls.append(list(items)) or list(items), max_batch=4, max_wait_s=0.5, max_queue=8)
    t0 = time.monotonic()
    assert b.submit("alone").result(5) == "alone"
    assert time.monotonic() - t0 < 0.25  # nothing announced: no wait for company
    b.announce()  # an image still being decoded
    first = b.submit("a")
    time.sleep(0.05)
    second = b.submit("b", announced=True)
    assert (first.result(5), second.result(5)) == ("a", "b") and calls[-1] == ["a", "b"]  # one pass for both
    b.announce()
    f = b.submit("c")
    time.sleep(0.05)
    b.withdraw()  # its decode failed: the batch goes without it
    assert f.result(5) == "c" and calls[-1] == ["c"]
    b.close(5)


@pytest.mark.parametrize("kind", ["rgb", "gray", "rgba"])
def test_decode_gives_rgb_like_read_image(tmp_path, kind):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    rgb[..., 0] = 250  # a red cast: a channel swap cannot pass
    img = {"rgb": rgb[..., ::-1], "gray": rgb[..., 1], "rgba": np.dstack([rgb[..., ::-1], np.full((20, 30), 90, np.uint8)])}[kind]
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), np.ascontiguousarray(img))
    got = decode_image(path.read_bytes())
    np.testing.assert_array_equal(got, read_image(path))
    assert got.dtype == np.uint8 and got.shape == (20, 30, 3)
    if kind == "rgb":
        np.testing.assert_array_equal(got, rgb)
    with pytest.raises(Exception, match="image too small: 30x20"):
        decode_image(path.read_bytes(), DecodeLimits(min_side=21))
