"""The HTTP routes (FastAPI): predict one image or a batch, list models, health, metrics, page.

Every error a client can cause is a JSON ``{"error": one line, "kind": ...}`` with a 4xx:

    400 bad_image          empty body, not an image, truncated, 1x1, corrupt pixel data
    400 bad_request        multipart body without an 'image' file, unknown ?map= value
    401 unauthorized       missing or wrong bearer token (limits.py)
    404 unknown_model      ?model=NAME not served;  not_found: no such route
    413 body_too_large     over --max-body-mb (limits.py);  image_too_large: header over the pixel limit
    415 unsupported_media  neither multipart/form-data nor an image/* content type
    422 unusable_image     an image the model cannot take (e.g. smaller than its patch grid)
    425 not_ready          models still loading (Retry-After); /readyz says when
    503 overloaded         queue full or too many requests in flight (Retry-After)
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from contextlib import asynccontextmanager

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
import anyio
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import DataError
from .auth import BearerAuth
from .batcher import Overloaded
from .decode import ImageTooLarge, decode_image
from .limits import Gate
from .metrics import ServeMetrics
from .models import ModelPool, NotReady, UnknownModel
from .options import DecodeLimits, HttpLimits
from .page import PAGE

MAP_KINDS = {None: None, "": None, "none": None, "png": "overlay", "overlay": "overlay", "mask": "mask"}


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


def _image_error(exc: DataError) -> ApiError:
    return ApiError(413, "image_too_large", str(exc)) if isinstance(exc, ImageTooLarge) else ApiError(400, "bad_image", str(exc))


async def _image_parts(request: Request, many: bool, limit: int) -> list[tuple[str | None, bytes]]:
    """[(filename, bytes)] from a multipart body (field 'image') or a raw image/* body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=limit + 1, max_fields=limit + 8)
        except StarletteHTTPException as exc:  # malformed multipart, too many parts
            raise ApiError(400, "bad_request", f"unreadable multipart body: {exc.detail}") from None
        try:
            files = [v for v in form.getlist("image") if isinstance(v, UploadFile)]
            if not files:
                raise ApiError(400, "bad_request", "the multipart body has no file field named 'image'")
            if len(files) > (limit if many else 1):
                raise ApiError(400, "bad_request", f"{len(files)} files in one request; at most {limit if many else 1}"
                               + ("" if many else " (use /v1/predict/batch for several)"))
            return [(f.filename, await f.read()) for f in files]
        finally:
            await form.close()
    if ctype.startswith("image/"):
        if many:
            raise ApiError(415, "unsupported_media", "/v1/predict/batch takes multipart/form-data with one 'image' field per image")
        return [(None, await request.body())]
    raise ApiError(415, "unsupported_media", f"Content-Type {ctype or '(none)'}: send multipart/form-data with a file field "
                   "'image', or the raw image bytes with Content-Type image/png (or image/jpeg, ...)")


def build_app(pool: ModelPool, metrics: ServeMetrics, decode_limits: DecodeLimits = DecodeLimits(),
              http: HttpLimits = HttpLimits(), token: str | None = None) -> FastAPI:
    """The ASGI app over ``pool``; loading starts with the app's lifespan, batchers drain at its end."""
    recent: deque = deque(maxlen=http.recent)

    workers: list[anyio.CapacityLimiter] = []

    @asynccontextmanager
    async def lifespan(app):
        # decoding and PNG answers run on a few threads, not anyio's default 40: each thread
        # gets its own malloc arena, and 40 of them let the RSS creep up under a long soak
        workers.append(anyio.CapacityLimiter(http.io_threads))
        pool.start()
        yield
        await run_in_threadpool(pool.close)

    async def on_thread(fn, *args):
        return await anyio.to_thread.run_sync(fn, *args, limiter=workers[0])

    app = FastAPI(title="pyimgano", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(Gate, metrics=metrics, max_body_bytes=http.max_body_bytes, max_inflight=http.max_inflight,
                       auth=BearerAuth(token) if token else None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        metrics.errors.labels(kind=exc.kind).inc()
        return JSONResponse({"error": exc.message, "kind": exc.kind}, exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        msg = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        metrics.errors.labels(kind=kind).inc()
        return JSONResponse({"error": msg, "kind": kind}, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        e = exc.errors()[0]
        metrics.errors.labels(kind="bad_request").inc()
        return JSONResponse({"error": f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}", "kind": "bad_request"}, 400)

    def slot(name: str | None):
        try:
            return pool.get(name)
        except UnknownModel as exc:
            raise ApiError(404, "unknown_model", str(exc)) from None
        except NotReady as exc:
            raise ApiError(425, "not_ready", str(exc), {"Retry-After": "1"}) from None

    def map_kind(value: str | None) -> str | None:
        if value not in MAP_KINDS:
            raise ApiError(400, "bad_request", f"map={value!r}: use map=png (overlay) or map=mask")
        return MAP_KINDS[value]

    async def score(m, data: bytes, kind: str | None, name: str | None) -> dict:
        """Decode (thread), score (the model's batcher), answer (thread); one image."""
        m.batcher.announce()
        try:
            image = await on_thread(decode_image, data, decode_limits)
        except BaseException as exc:
            m.batcher.withdraw()
            if isinstance(exc, DataError):
                raise _image_error(exc) from None
            raise
        try:
            fut = m.batcher.submit(image, announced=True)
        except Overloaded as exc:
            raise ApiError(503, "overloaded", f"{exc}; retry shortly", {"Retry-After": "1"}) from None
        try:
            result = await asyncio.wrap_future(fut)
        except DataError as exc:
            raise ApiError(422, "unusable_image", str(exc)) from None
        if not math.isfinite(result.score):
            raise ApiError(422, "unusable_image", "the model gave a non-finite score for this image")
        try:  # a PNG answer is encoded on a thread; the plain JSON one right here (one thread hop less)
            body = await on_thread(m.answer, image, result, kind) if kind else m.answer(image, result, kind)
        except DataError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        metrics.images.labels(model=m.name).inc()
        if result.is_anomalous:
            metrics.flagged.labels(model=m.name).inc()
        recent.appendleft({"time": time.time(), "model": m.name, "name": name, "score": result.score,
                           "is_anomalous": result.is_anomalous})
        return body

    @app.post("/v1/predict")
    async def predict(request: Request, model: str | None = None, map_: str | None = Query(None, alias="map")):
        t0 = time.perf_counter()
        kind, m = map_kind(map_), slot(model)
        (name, data), = await _image_parts(request, False, 1)
        body = await score(m, data, kind, name)
        body["latency_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        return body

    @app.post("/v1/predict/batch")
    async def predict_batch(request: Request, model: str | None = None, map_: str | None = Query(None, alias="map")):
        t0 = time.perf_counter()
        kind, m = map_kind(map_), slot(model)
        parts = await _image_parts(request, True, http.max_batch_images)
        done = await asyncio.gather(*(score(m, data, kind, name) for name, data in parts), return_exceptions=True)
        results = []
        for (name, _), r in zip(parts, done):
            if isinstance(r, ApiError):
                if r.status == 503:  # overload is about the server, not the image: the whole batch is refused
                    raise r
                results.append({"filename": name, "error": r.message, "kind": r.kind, "status": r.status})
            elif isinstance(r, BaseException):
                raise r
            else:
                results.append({"filename": name, **r})
        ok = [r for r in results if "error" not in r]
        if not ok:
            first = results[0]
            raise ApiError(first["status"], first["kind"], f"no image of the batch could be scored; image 1 ({first['filename']}): {first['error']}")
        return {"model": m.name, "n_images": len(results), "n_failed": len(results) - len(ok), "results": results,
                "latency_ms": round((time.perf_counter() - t0) * 1000, 3)}

    @app.get("/v1/models")
    async def models():
        if not pool.ready.is_set():
            slot(None)  # 425 while loading
        return {"default": pool.specs[0][0], "models": [m.info() for m in pool.models.values()]}

    @app.get("/v1/recent")
    async def recent_results():
        return {"results": list(recent)}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if pool.ready.is_set():
            return {"ready": True, "models": list(pool.models), "ready_s": pool.ready_s}
        body = {"ready": False, "error": f"the models failed to load: {pool.failed}" if pool.failed else "models loading",
                "loaded": list(pool.models)}
        return JSONResponse(body, 503, headers={"Retry-After": "1"})

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE)

    return app
