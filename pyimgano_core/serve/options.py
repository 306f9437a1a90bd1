"""Everything ``pyimgano serve`` can be told, as plain dataclasses (importing this needs no extra)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class BatchSettings:
    max_batch: int = 8  # images per forward pass (at most engine.CHUNK = 16)
    max_wait_ms: float = 10.0  # longest wait for images still being decoded (a lone request never waits)
    max_queue: int = 32  # images waiting per model; one more -> 503


@dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = 32 << 20
    max_inflight: int = 64  # requests between the socket and an answer; one more -> 503
    max_batch_images: int = 16  # images in one /v1/predict/batch request
    recent: int = 20  # results kept for the page's "last results"
    io_threads: int = 4  # threads decoding requests and encoding PNG answers


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 50_000_000  # 50 MP: a 7000x7000 frame; 30000x30000 (900 MP) is refused from its header
    min_side: int = 16  # a 1x1 "image" is no picture of a part


@dataclass
class ServeOptions:
    models: Sequence[str]  # "DIR" or "NAME=DIR"
    runtime: str = "torch"
    host: str = "127.0.0.1"
    port: int = 8000
    token_file: str | None = None
    batching: BatchSettings = field(default_factory=BatchSettings)
    http: HttpLimits = field(default_factory=HttpLimits)
    decode: DecodeLimits = field(default_factory=DecodeLimits)
    drain_s: float = 30.0  # longest wait for requests in flight after SIGTERM
