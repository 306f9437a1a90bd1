"""Jobs for executor tests, in a module Ray workers can import (``tests.ray_jobs``)."""
from __future__ import annotations

import os
from pathlib import Path

from pyimgano_core.errors import DataError


def die_until(counter: str, deaths: int, progress=None) -> dict:
    """A job whose worker process dies (os._exit: no exception, no cleanup) on its first ``deaths`` runs."""
    path = Path(counter)
    n = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(n))
    if n <= deaths:
        os._exit(1)
    return {"runs": n}


def bad_data(progress=None) -> dict:
    raise DataError("widget/test/scratch/000.png: cannot read")


def thread_probe(progress=None) -> dict:
    """The job's torch thread count and the bits of a float32 matmul whose sums torch splits by thread."""
    import hashlib

    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 512, generator=g), torch.randn(512, 300, generator=g)
    return {"threads": torch.get_num_threads(), "matmul_sha256": hashlib.sha256((a @ b).numpy().tobytes()).hexdigest()}
