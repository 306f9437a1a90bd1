"""Time and peak memory of ``pixel_metrics`` on an MVTec-sized evaluation.

83 float32 anomaly maps of 900x900 (67M pixels), smooth noise plus raised blobs;
masks hold 1-4 elliptical defects on 60 of the images, the rest are defect-free.

    python benchmarks/bench_metrics.py             # pixel_metrics only
    python benchmarks/bench_metrics.py --sklearn   # also time sklearn on the same pixels
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
from scipy import ndimage

from pyimgano_core.metrics import pixel_metrics


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def make_case(n_images: int = 83, size: int = 900, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks, maps = [], []
    for i in range(n_images):
        mask = np.zeros((size, size), dtype=bool)
        if i < 60:
            for _ in range(rng.integers(1, 5)):
                cy, cx = rng.integers(50, size - 50, 2)
                ry, rx = rng.integers(4, 60, 2)
                mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        noise = rng.standard_normal((size // 4, size // 4)).astype(np.float32)
        amap = ndimage.zoom(ndimage.gaussian_filter(noise, 2), 4, order=1)
        amap += 0.8 * ndimage.gaussian_filter(mask.astype(np.float32), 6)
        masks.append(mask)
        maps.append(amap.astype(np.float32))
    return masks, maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sklearn", action="store_true")
    args = parser.parse_args()

    masks, maps = make_case()
    n = sum(m.size for m in maps)
    print(f"{len(maps)} maps, {n / 1e6:.1f}M pixels, {sum(m.sum() for m in masks)} defect "
          f"pixels; peak RSS after building inputs {peak_rss_gib():.2f} GiB")
    start = time.perf_counter()
    result = pixel_metrics(masks, maps)
    print(f"pixel_metrics: {time.perf_counter() - start:.2f} s, "
          f"peak RSS {peak_rss_gib():.2f} GiB -> {result}")

    if args.sklearn:
        from sklearn.metrics import average_precision_score, roc_auc_score

        y = np.concatenate([m.ravel() for m in masks])
        s = np.concatenate([m.ravel() for m in maps])
        start = time.perf_counter()
        auroc = roc_auc_score(y, s)
        print(f"sklearn roc_auc_score: {time.perf_counter() - start:.2f} s -> {auroc}")
        start = time.perf_counter()
        ap = average_precision_score(y, s)
        print(f"sklearn average_precision_score: {time.perf_counter() - start:.2f} s -> {ap}")
        print(f"differences: auroc {abs(auroc - result['pixel_auroc']):.2e}, "
              f"ap {abs(ap - result['pixel_ap']):.2e}; peak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
