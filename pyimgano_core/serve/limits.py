"""The gate every request passes before a route: token, in-flight limit, body size, metrics.

A plain ASGI middleware (no buffering): the body limit is enforced both from Content-Length
and while the body streams in, so a client that lies about its length is cut off too.
"""
from __future__ import annotations

import json
import time

from .auth import BearerAuth
from .metrics import ServeMetrics

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/", "/favicon.ico"})  # health, and the page (static, no data)
ROUTES = frozenset({"/healthz", "/readyz", "/metrics", "/", "/v1/predict", "/v1/predict/batch", "/v1/models", "/v1/recent"})


class BodyTooLarge(Exception):
    pass


def json_error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> tuple[int, list, bytes]:
    body = json.dumps({"error": message, "kind": kind}).encode()
    h = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    h += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return status, h, body


class Gate:
    def __init__(self, app, metrics: ServeMetrics, max_body_bytes: int, max_inflight: int, auth: BearerAuth | None = None):
        self.app, self.metrics, self.auth = app, metrics, auth
        self.max_body, self.max_inflight, self.inflight = max_body_bytes, max_inflight, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "other"
        t0, status = time.perf_counter(), [0]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        async def refuse(code, kind, message, headers=None):
            st, h, body = json_error(code, kind, message, headers)
            self.metrics.errors.labels(kind=kind).inc()
            await send_counted({"type": "http.response.start", "status": st, "headers": h})
            await send_counted({"type": "http.response.body", "body": body})

        try:
            headers = dict(scope["headers"])
            if self.auth is not None and path not in OPEN_PATHS and not self.auth.ok(headers.get(b"authorization")):
                return await refuse(401, "unauthorized", "missing or wrong token: send the header 'Authorization: Bearer <token>'",
                                    {"WWW-Authenticate": "Bearer"})
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                return await refuse(413, "body_too_large", f"request body of {length.decode(errors='replace')} bytes; "
                                    f"this server takes at most {self.max_body} bytes")
            if self.inflight >= self.max_inflight:
                return await refuse(503, "overloaded", f"{self.inflight} requests in progress; retry shortly", {"Retry-After": "1"})
            self.inflight += 1
            seen = [0]

            async def receive_limited():
                message = await receive()
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > self.max_body:
                        raise BodyTooLarge
                return message

            try:
                await self.app(scope, receive_limited, send_counted)
            except BodyTooLarge:
                if status[0]:
                    raise
                await refuse(413, "body_too_large", f"request body over {self.max_body} bytes")
            finally:
                self.inflight -= 1
        finally:
            self.metrics.requests.labels(route=route, code=str(status[0] or 500)).inc()
            self.metrics.latency.labels(route=route).observe(time.perf_counter() - t0)
