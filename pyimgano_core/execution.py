"""Where engine calls run: in this process (:class:`LocalExecutor`) or as Ray tasks (:class:`RayExecutor`).

A :class:`Job` is a name, a module-level function and JSON-able keyword arguments (a config
dict, a category, an output folder). Only plain data crosses to a worker, and every job calls
the same engine functions as a local run, so results do not depend on the executor: it only
decides *where* the engine runs.

Threads: float32 sums (oneDNN convolutions, MKL sgemm in the kNN search) are split by thread,
so the same job at 1 and at 2 torch threads differs in its last bits (MVTec bottle: features
3.8e-6, image scores 1.2e-4; reports/ray.md). Every executor therefore runs a job at one thread
count (:func:`pinned_threads`), ``cpus_per_task`` or, by default, what a local run here uses; a
Ray task also reserves that many CPUs (Ray would otherwise start its workers at one thread).

Failures: a job that raises a user error (:class:`PyimganoError`: bad data, bad model) fails
the same way everywhere and is not retried. A Ray task whose worker *died* (killed, out of
memory, node lost) is resubmitted up to ``max_retries`` times, then reported by name; the
other jobs' results are kept either way.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from . import errors
from .errors import ConfigError, ExecutionError, PyimganoError
from .optional import require


CONNECT_TIMEOUT_S = 3.0  # an unreachable cluster address fails within a few seconds
MAX_RETRIES = 2  # default of the config's execution section (and of --ray without a config)


class ExecutionConfig(BaseModel):
    """The ``execution`` section: where per-category runs and sharded exports execute. Results do
    not depend on where, only (in float32 rounding) on the thread count, which every executor pins
    to ``cpus_per_task``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    backend: Literal["local", "ray"] = Field("local", description="local: this process, one job after another; ray: Ray tasks")
    address: str = Field("auto", description="ray: 'auto' (a running cluster), 'local' (start one in-process), host:port or ray://host:port")
    cpus_per_task: int | None = Field(None, ge=1, description=(
        "torch/BLAS threads of each job on every executor (float32 sums depend on it: compare runs at one count); "
        "ray: CPUs reserved per task too. null: this machine's torch thread count, as a local run"))
    max_retries: int = Field(MAX_RETRIES, ge=0, description="ray: resubmissions of a task whose worker died (killed, out of memory)")


@dataclass(frozen=True)
class Job:
    """``fn(**kwargs, progress=...)`` -> dict; ``fn`` must be importable by workers (module level)."""

    name: str
    fn: Callable[..., dict]
    kwargs: dict


@dataclass
class JobResult:
    name: str
    value: dict | None = None
    error: PyimganoError | None = None
    attempts: int = 1
    resumed: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


def raise_failures(results: Sequence[JobResult]) -> None:
    """Raise the first failure (its own type and exit code), naming the others."""
    failed = [r for r in results if not r.ok]
    if not failed:
        return
    first = failed[0]
    if len(results) == 1:
        raise first.error
    msg = f"[{first.name}] {first.error}"
    if len(failed) > 1:
        msg += f"; {len(failed) - 1} other job(s) failed too: {', '.join(r.name for r in failed[1:])}"
    raise type(first.error)(msg + f"; {len(results) - len(failed)} finished and kept")


def failures(results: Sequence[JobResult]) -> dict:
    """``{job name: {"error", "attempts"}}`` for a summary."""
    return {r.name: {"error": str(r.error), "type": type(r.error).__name__, "attempts": r.attempts} for r in results if not r.ok}


def current_threads() -> int | None:
    """This process's torch intra-op thread count (None while torch is not loaded: ONNX runtime paths)."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def default_threads() -> int:
    """The thread count of a local run here: torch's (it follows OMP_NUM_THREADS, else the cores)."""
    n = current_threads()
    return n if n is not None else len(os.sched_getaffinity(0))


@contextlib.contextmanager
def pinned_threads(n: int | None):
    """Run a block with ``n`` torch intra-op and BLAS threads (None: as they are), restored after."""
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    saved_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if torch is None:  # read by torch when the job imports it (no torch import for ONNX-only jobs)
        os.environ.update(OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n))
    else:
        before = torch.get_num_threads()
        torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n, user_api="blas"):  # numpy's BLAS (and MKL/OpenBLAS loaded by others)
            yield
    finally:
        if torch is None:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        else:
            torch.set_num_threads(before)


class LocalExecutor:
    """Run jobs one after another in this process (the default; needs nothing installed),
    at ``threads`` torch/BLAS threads (None: this process's own count)."""

    backend = "local"

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def run(self, jobs: Sequence[Job], progress=None) -> list[JobResult]:
        results = []
        for job in jobs:
            try:
                with pinned_threads(self.threads):
                    results.append(JobResult(job.name, job.fn(**job.kwargs, progress=progress)))
            except PyimganoError as exc:
                results.append(JobResult(job.name, error=exc))
        return results

    def close(self) -> None: ...


def _call(fn: Callable[..., dict], kwargs: dict, cwd: str, threads: int) -> tuple:
    """The Ray task body: run one job in the driver's working directory at the driver's thread
    count (Ray starts workers with OMP_NUM_THREADS=1); user errors become data."""
    if os.path.isdir(cwd):  # relative dataset/weight paths resolve as on the driver (same layout on every node)
        os.chdir(cwd)
    try:
        with pinned_threads(threads):
            return ("ok", fn(**kwargs, progress=None))
    except PyimganoError as exc:
        return ("error", type(exc).__name__, str(exc))


def _died_errors(ray) -> tuple[type, ...]:
    """Ray's errors for a task whose worker or node went away (worth a retry), not for a bug in it."""
    ex = ray.exceptions
    names = ("WorkerCrashedError", "OutOfMemoryError", "NodeDiedError", "ObjectLostError", "LocalRayletDiedError", "ActorDiedError")
    return tuple(getattr(ex, n) for n in names if hasattr(ex, n))


class RayExecutor:
    """Run jobs as Ray tasks, ``cpus_per_task`` CPUs and torch threads each (None: this machine's
    thread count, as a local run), resubmitting tasks whose worker died."""

    backend = "ray"

    def __init__(self, address: str = "auto", cpus_per_task: int | None = None, max_retries: int = MAX_RETRIES):
        if address != "local":
            # Read when Ray is imported: its driver tries a GCS 20 times, a second apart, by default;
            # an address that answers TCP but is no Ray head (a proxy, another service) then fails
            # in a few seconds. A user's own setting wins.
            os.environ.setdefault("RAY_NUM_REDIS_GET_RETRIES", str(int(CONNECT_TIMEOUT_S)))
        self.ray = require("ray", "ray")
        self.threads, self.max_retries = cpus_per_task or default_threads(), max_retries
        self._started = connect(self.ray, address)
        try:
            self._check_fits(cpus_per_task is None)
        except ConfigError:
            self.close()
            raise
        cpus = self.ray.cluster_resources().get("CPU", 1)
        self.slots = max(1, int(cpus // self.threads))
        self._task = self.ray.remote(_call).options(num_cpus=self.threads, max_retries=0, retry_exceptions=False)

    def _check_fits(self, defaulted: bool) -> None:
        """A task that asks more CPUs than any node has would wait forever: say so now."""
        largest = max(((n.get("Resources") or {}).get("CPU", 0) for n in self.ray.nodes() if n.get("Alive")), default=0)
        if self.threads > largest:
            why = " (this machine's thread count, the default)" if defaulted else ""
            raise ConfigError(f"execution.cpus_per_task={self.threads}{why}: no Ray node has that many CPUs (largest: {largest:g}); "
                              f"set it to at most {int(largest)}, and to the same for a local run to compare")

    def share(self, obj: Any) -> list:
        """Put ``obj`` in the object store once; the list keeps Ray from fetching it for every task."""
        return [self.ray.put(obj)]

    def run(self, jobs: Sequence[Job], progress=None) -> list[JobResult]:
        ray = self.ray
        cwd = os.getcwd()
        died = _died_errors(ray)
        results: list[JobResult | None] = [None] * len(jobs)
        pending = {}

        def submit(i: int, attempt: int) -> None:
            pending[self._task.remote(jobs[i].fn, jobs[i].kwargs, cwd, self.threads)] = (i, attempt)

        for i in range(len(jobs)):
            submit(i, 1)
        if progress is not None:
            progress.start(f"{len(jobs)} job(s) on Ray ({self.slots} at a time)", len(jobs))
        try:
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                i, attempt = pending.pop(ref)
                name = jobs[i].name
                try:
                    out = ray.get(ref)
                except died as exc:
                    if attempt <= self.max_retries:
                        submit(i, attempt + 1)
                        continue
                    err = ExecutionError(f"worker died {attempt} time(s) ({type(exc).__name__}); gave up after {self.max_retries} retries")
                    results[i] = JobResult(name, error=err, attempts=attempt)
                except ray.exceptions.RayTaskError as exc:  # a bug in the job: not retried, reported
                    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                    first = str(cause).strip().splitlines()
                    results[i] = JobResult(name, error=ExecutionError(f"{type(cause).__name__}: {first[-1] if first else ''}"), attempts=attempt)
                else:
                    if out[0] == "ok":
                        results[i] = JobResult(name, out[1], attempts=attempt)
                    else:
                        results[i] = JobResult(name, error=getattr(errors, out[1], PyimganoError)(out[2]), attempts=attempt)
                if progress is not None:
                    progress.advance(1)
        finally:
            if progress is not None:
                progress.stop()
        return results

    def close(self) -> None:
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()


def connect(ray, address: str) -> bool:
    """Join (or start) a Ray cluster; True when this call started it. Fails fast with one line."""
    if ray.is_initialized():  # an embedding program (or a test) already chose the cluster
        return False
    quiet = dict(logging_level=logging.ERROR, log_to_driver=False)
    try:
        if address == "local":
            ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, **quiet)
            return True
        if address != "auto":
            _check_reachable(address)
        with _stderr_on_success():  # Ray's C++ client logs a warning line per failed GCS attempt
            ray.init(address=address, **quiet)
    except PyimganoError:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError, grpc errors
        text = str(exc).strip().splitlines()
        raise ExecutionError(f"cannot connect to the Ray cluster at {address!r}: {text[0] if text else type(exc).__name__}") from None
    return False


@contextlib.contextmanager
def _stderr_on_success():
    """Hold what native code writes to stderr (fd 2); replay it only if the block succeeds, so a
    failed connect ends in our one line."""
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (embedded): nothing to hold
        yield
        return
    with tempfile.TemporaryFile() as held:
        sys.stderr.flush()
        os.dup2(held.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if ok:
                held.seek(0)
                os.write(2, held.read())


# An HTTP/2 client connection preface and an empty SETTINGS frame (RFC 9113 section 3.4): the
# GCS and the Ray Client server are gRPC servers, which answer it with their own SETTINGS frame.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _check_reachable(address: str) -> None:
    """Ray's own connect retries for a long time, and waits without limit on a listener that
    accepts and never answers; this probe answers within CONNECT_TIMEOUT_S: a TCP connect, then
    the preface, which must get *some* reply (any bytes or a close: Ray judges those itself, e.g.
    a TLS-only head)."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"execution.address: expected 'auto', 'local', host:port or ray://host:port, got {address!r}")
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S) as conn:
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                conn.sendall(_H2_PREFACE)
                conn.recv(1)
            except TimeoutError:
                raise ExecutionError(f"cannot connect to the Ray cluster at {address!r}: it accepts connections but sends "
                                     f"nothing within {CONNECT_TIMEOUT_S:.0f} s (not a Ray head or Ray Client server?)") from None
            except OSError:  # reset or closed on the preface: an answer; Ray says what it is
                pass
    except OSError as exc:
        raise ExecutionError(f"cannot reach the Ray cluster at {address!r} within {CONNECT_TIMEOUT_S:.0f} s: {exc.strerror or exc}") from None


def make_executor(cfg: ExecutionConfig | None = None, ray_address: str | None = None) -> LocalExecutor | RayExecutor:
    """The executor of an ``execution`` config section (None: the defaults); ``ray_address``
    (``--ray``) selects Ray at that address whatever the section says."""
    backend = "ray" if ray_address is not None else (cfg.backend if cfg is not None else "local")
    if backend == "local":
        return LocalExecutor(cfg.cpus_per_task if cfg is not None else None)
    if cfg is None:
        return RayExecutor(ray_address)
    return RayExecutor(ray_address or cfg.address, cfg.cpus_per_task, cfg.max_retries)
