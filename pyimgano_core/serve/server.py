"""``pyimgano serve``: bind, serve with uvicorn, stop cleanly on SIGTERM / Ctrl-C.

uvicorn runs in a worker thread and this (main) thread owns the signals: SIGTERM or SIGINT
asks uvicorn to stop accepting, finish the requests in flight (up to ``drain_s``), then the
app's lifespan drains the batchers; the process then exits 0. A second SIGINT forces it.
The socket is bound here first, so a busy port is one line of error and ``--port 0`` picks
a free one (announced on stderr).
"""
from __future__ import annotations

import ctypes
import signal
import socket
import threading
import time
from typing import Callable

from ..errors import ConfigError, ModelError
from ..optional import require
from .auth import read_token
from .options import ServeOptions


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def bound_malloc() -> bool:
    """glibc only: at most 2 malloc arenas. Each thread that allocates (event loop, decoders,
    the batch worker, torch's and faiss's pools) otherwise may get its own arena, and each
    keeps its high-water mark: the server's RSS crept up 84 MB over a 5,000-request soak. (A
    fixed 256 KB mmap threshold bounded it too but cost +32 ms per 900x900 image in page faults.)"""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-8, 2) == 1  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc
        return False


def build(opts: ServeOptions):
    """(ASGI app, its model pool) for ``opts``; specs and token checked here, models load with the
    app's lifespan (tests and benchmarks drive the app in-process with this)."""
    from .app import build_app  # FastAPI and prometheus_client: the serve extra, loaded here
    from .metrics import ServeMetrics
    from .models import ModelPool, parse_specs

    specs = parse_specs(opts.models, opts.runtime)
    if opts.runtime == "torch":  # before listening: a lean install says which extra, in one line
        require("torch", extra="torch")
    token = read_token(opts.token_file) if opts.token_file else None
    metrics = ServeMetrics()
    pool = ModelPool(specs, opts.runtime, opts.batching, metrics)
    return build_app(pool, metrics, opts.decode, opts.http, token), pool


def serve(opts: ServeOptions, announce: Callable[[str], None] = lambda msg: None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code (0, or 4 when a model failed to load)."""
    bound_malloc()
    uvicorn = require("uvicorn", extra="serve")
    for module in ("fastapi", "python_multipart", "prometheus_client"):
        require(module, extra="serve")
    t_start = time.monotonic()
    app, pool = build(opts)
    specs = pool.specs
    token = opts.token_file
    sock = bind(opts.host, opts.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=opts.drain_s, limit_concurrency=opts.http.max_inflight * 2)
    server = uvicorn.Server(config)
    worker = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="pyimgano-http")

    def stop(signum, frame):
        if server.should_exit and signum == signal.SIGINT:
            server.force_exit = True
        server.should_exit = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    failed = None
    try:
        worker.start()
        announce(f"listening on http://{host}:{port} ({len(specs)} model(s), runtime {opts.runtime}"
                 + (", bearer token required" if token else "") + ")")
        said_ready = False
        while worker.is_alive():
            worker.join(0.1)
            if pool.ready.is_set() and not said_ready:
                said_ready = True
                announce(f"ready in {time.monotonic() - t_start:.2f} s: " + ", ".join(f"{n} ({pool.models[n].loaded_s:.2f} s)" for n, _ in specs))
            if pool.failed and not server.should_exit:
                failed = pool.failed
                server.should_exit = True
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        sock.close()
    if failed:
        raise ModelError(f"could not load the models: {failed}")
    if not server.started:
        raise ConfigError(f"the HTTP server on {host}:{port} did not start (see the lines above)")
    announce("stopped: in-flight requests answered, queues drained")
    return 0
