"""Micro-batching: concurrent requests for one model share one forward pass.

One worker thread per model takes the oldest waiting image, then whatever else is already
queued (up to ``max_batch``), and scores them in one call. It waits for more (at most
``max_wait_s``) only while other requests have announced an image that is still being
decoded (:meth:`MicroBatcher.announce`), so a lone client never waits and concurrent ones
share a pass. While a batch runs, new requests queue up, so under load batches fill by
themselves. The queue is bounded: a full queue refuses at
once (:class:`Overloaded`, HTTP 503 + Retry-After) instead of growing.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Sequence

_STOP = object()


class Overloaded(Exception):
    """The queue is full (or the batcher is closing): try again later."""


@dataclass
class _Job:
    item: Any
    future: Future


class MicroBatcher:
    """``submit(item) -> Future``; ``score(items) -> results`` runs on the worker, in order.

    ``score`` must return one result per item (an exception object counts as a result: it is
    set on that item's future); an exception it raises fails the whole batch.
    """

    def __init__(self, score: Callable[[Sequence], Sequence], max_batch: int = 8, max_wait_s: float = 0.002,
                 max_queue: int = 64, name: str = "model", on_batch: Callable[[int], None] | None = None):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_s >= 0")
        self.score, self.max_batch, self.max_wait_s = score, max_batch, max_wait_s
        self.on_batch = on_batch
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self._closing = False
        self._incoming = 0  # images announced (being decoded), not yet submitted
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._run, name=f"pyimgano-batch-{name}", daemon=True)
        self._worker.start()

    def depth(self) -> int:
        """Images waiting (not counting the batch being scored)."""
        return self._q.qsize()

    def announce(self) -> None:
        """An image for this model is on its way (decoding): worth waiting for. Pair with
        :meth:`submit` or :meth:`withdraw`."""
        with self._lock:
            self._incoming += 1

    def withdraw(self) -> None:
        """An announced image will not come (it could not be decoded)."""
        with self._lock:
            self._incoming -= 1

    def submit(self, item: Any, announced: bool = False) -> Future:
        fut: Future = Future()
        with self._lock:
            if announced:
                self._incoming -= 1
            if self._closing:
                raise Overloaded("the server is shutting down")
            try:
                self._q.put_nowait(_Job(item, fut))
            except queue.Full:
                raise Overloaded(f"the queue is full ({self._q.maxsize} images waiting)") from None
        return fut

    def _take(self) -> list[_Job] | None:
        first = self._q.get()
        if first is _STOP:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                if left <= 0 or self._incoming <= 0:
                    job = self._q.get_nowait()
                else:  # short waits: an announced image may be withdrawn
                    job = self._q.get(timeout=min(left, 0.0005))
            except queue.Empty:
                if left <= 0 or self._incoming <= 0:
                    break
                continue
            if job is _STOP:  # finish this batch, then stop
                self._q.put_nowait(_STOP)
                break
            batch.append(job)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            if self.on_batch:
                self.on_batch(len(batch))
            try:
                results = self.score([j.item for j in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"score returned {len(results)} results for {len(batch)} items")
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
                for j in batch:
                    j.future.set_exception(exc)
                continue
            for j, r in zip(batch, results):
                if isinstance(r, BaseException):
                    j.future.set_exception(r)
                else:
                    j.future.set_result(r)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new work, finish everything queued, stop the worker."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._q.put(_STOP)  # blocks only while the queue is full; the worker is draining it
        self._worker.join(timeout)
