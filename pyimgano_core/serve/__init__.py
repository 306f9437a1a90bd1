"""An HTTP inspection service over :func:`pyimgano_core.infer.load_model` (``pyimgano serve``).

Optional extra: ``pip install "pyimgano[serve]"`` (FastAPI, uvicorn, prometheus-client,
python-multipart, onnxruntime). Nothing here imports torch unless ``--runtime torch``:

    options.py   what the server can be told (dataclasses)
    decode.py    request bytes -> RGB array, or one clear reason
    batcher.py   concurrent requests -> one forward pass (bounded batch, wait and queue)
    models.py    named models, loaded and warmed in the background; JSON answers, overlays
    auth.py      bearer token, compared in constant time
    limits.py    the ASGI gate: token, body size, requests in flight, request metrics
    metrics.py   Prometheus counters, histograms and gauges
    page.py      the operator page at /
    app.py       the routes and their JSON errors
    server.py    bind, run uvicorn, drain on SIGTERM
"""
from __future__ import annotations

from .options import BatchSettings, DecodeLimits, HttpLimits, ServeOptions
from .server import serve  # imports FastAPI/uvicorn only when called

__all__ = ["BatchSettings", "DecodeLimits", "HttpLimits", "ServeOptions", "serve"]
