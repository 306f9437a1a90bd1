"""SoftPatch near-ties: how far torch and onnxruntime disagree on distances, and which tie window
``softpatch.matched_weight`` needs (the measurement behind ``TIE_RTOL``).

For a fitted SoftPatch model folder (e.g. the one ``benchmarks/onnx_parity.py`` fits for
configs/mvtec_softpatch_mobilenet.yaml) and every bottle test image: the 8 nearest memory entries
of every test patch with their squared distances, once from the torch path (``KNNIndex``) and once
from an ONNX graph of the same network and search (``deploy/graph.py``'s head, matmul + TopK) run
by onnxruntime. Reported: the runtimes' relative difference of one (patch, entry) distance, how
often the runner-up lies within a window, and for each window the largest patch-score difference
between the runtimes (relative to the image's hottest patch) and how much the rule moves scores
away from the nearest entry's weight alone (the reference's rule).

    python benchmarks/softpatch_ties.py MODEL_DIR      # -> reports/softpatch_ties.{json,md}
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
K = 8
WINDOWS = (1e-3, 3e-3, 1e-2, 3e-2)


def topk_both(folder: Path, config: Path, threads: int):
    import torch

    from pyimgano_core.config import load_config
    from pyimgano_core.data import load_splits
    from pyimgano_core.deploy.onnx_export import build_graph
    from pyimgano_core.deploy.onnx_runtime import session_from_bytes
    from pyimgano_core.model import Model

    torch.set_num_threads(threads)
    model = Model.load(folder)
    det = model.detector
    paths = [s.path for s in load_splits(load_config(config).dataset)[0].test]
    hw = det.geometry.input_hw((900, 900))
    graph = build_graph(model, folder, hw)

    class TopK(torch.nn.Module):  # the graph's head and distance expansion, TopK instead of the weighting
        def forward(self, image):
            f = graph.head(image.permute(0, 3, 1, 2).to(torch.float32) / 255.0)
            q = f.reshape(-1, f.shape[-1])
            score = (q @ graph.bank_t) * -2.0 + graph.bank_sq + (q * q).sum(1, keepdim=True)
            v, i = torch.topk(score, K, dim=1, largest=False)
            return torch.clamp(v, min=0.0), i

    buf = io.BytesIO()
    torch.onnx.export(TopK().eval(), (torch.zeros(1, *hw, 3, dtype=torch.uint8),), buf, dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["d2", "idx"], dynamic_axes={"image": {0: "b"}, "d2": {0: "b"}, "idx": {0: "b"}})
    session = session_from_bytes(buf.getvalue(), threads=threads)
    out = {"t2": [], "ti": [], "o2": [], "oi": []}
    for s in range(0, len(paths), 8):
        for feats, batch in det._embed(paths[s : s + 8], {}):
            d, idx = det._knn().search(feats.reshape(-1, feats.shape[-1]), k=K)
            x = (batch.pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
            o2, oi = session.run(None, {"image": x})
            out["t2"].append(d.astype(np.float64) ** 2)
            out["ti"].append(idx)
            out["o2"].append(o2.astype(np.float64))
            out["oi"].append(oi)
    grid = int(feats.shape[1] * feats.shape[2])
    return {k: np.concatenate(v) for k, v in out.items()}, det.memory_weights_.astype(np.float64), grid, len(paths)


def weighted(d2, idx, w, window):
    """Patch scores d2_1 * weight: the nearest entry's weight (window None) or ``matched_weight`` with that window."""
    import torch

    from pyimgano_core.detectors.softpatch import TIE_NEIGHBOURS, matched_weight

    if window is None:
        return d2[:, 0] * w[idx[:, 0]]
    k = TIE_NEIGHBOURS
    return d2[:, 0] * matched_weight(torch.from_numpy(d2[:, :k]), torch.from_numpy(idx[:, :k]), torch.from_numpy(w), rtol=window).numpy()


def analyse(r, w, grid) -> dict:
    t2, ti, o2, oi = r["t2"], r["ti"], r["o2"], r["oi"]
    same = ti == oi
    noise = (np.abs(t2 - o2) / np.maximum(t2[:, :1], 1e-30))[same]
    gap = (t2[:, 1] - t2[:, 0]) / t2[:, 0]
    res = {"patches": int(len(t2)), "nearest_entry_same": float(np.mean(ti[:, 0] == oi[:, 0])),
           "distance_rel_diff_percentiles": dict(zip(("p50", "p99", "p99.9", "max"), map(float, [*np.percentile(noise, [50, 99, 99.9]), noise.max()]))),
           "rules": {}}
    ref = weighted(t2, ti, w, None).reshape(-1, grid)
    for window in (None, *WINDOWS):
        a, b = weighted(t2, ti, w, window).reshape(-1, grid), weighted(o2, oi, w, window).reshape(-1, grid)
        row = {"max_patch_diff_rel_to_hottest": float((np.abs(a - b) / a.max(1, keepdims=True)).max()),
               "max_image_score_rel_diff": float((np.abs(a.max(1) - b.max(1)) / a.max(1)).max())}
        if window is not None:
            moved = np.abs(a - ref) / ref
            row.update(runner_up_inside=float(np.mean(gap < window)),
                       five_or_more_inside=float(np.mean(((t2 - t2[:, :1]) / t2[:, :1] < window).sum(1) >= 5)),
                       mean_patch_change_vs_nearest_rule=float(moved.mean()), max_patch_change_vs_nearest_rule=float(moved.max()),
                       max_image_score_change_vs_nearest_rule=float((np.abs(a.max(1) - ref.max(1)) / ref.max(1)).max()))
        res["rules"]["nearest entry's weight" if window is None else f"window {window:g}"] = row
    return res


def markdown(res: dict) -> str:
    n = res["distance_rel_diff_percentiles"]
    lines = ["# SoftPatch near-ties: torch vs onnxruntime distances and the tie window", "",
             f"`python benchmarks/softpatch_ties.py {res['model']}` ({res['date']}; {res['n_images']} bottle test images, "
             f"{res['patches']:,} patches, {K} nearest entries each).", "",
             f"Same (patch, entry), squared distance, |torch - ORT| / nearest distance: median {n['p50']:.1e}, 99th percentile "
             f"{n['p99']:.1e}, 99.9th {n['p99.9']:.1e}, max {n['max']:.1e} (float32 |q|^2 - 2 q.m + |m|^2 cancellation: "
             f"largest where the distance is small). Same nearest entry: {res['nearest_entry_same']:.6f} of the patches.", "",
             "| rule | max patch diff ORT vs torch (rel. to hottest patch) | max image score diff (rel) | runner-up inside | "
             "5+ entries inside | patch change vs nearest-entry rule (mean / max) | image score change (max) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res["rules"].items():
        extra = ("| - | - | - | - |" if "runner_up_inside" not in r else
                 f"| {r['runner_up_inside']:.4f} | {r['five_or_more_inside']:.5f} | {r['mean_patch_change_vs_nearest_rule']:.1e} / "
                 f"{r['max_patch_change_vs_nearest_rule']:.3f} | {r['max_image_score_change_vs_nearest_rule']:.3f} |")
        lines.append(f"| {name} | {r['max_patch_diff_rel_to_hottest']:.1e} | {r['max_image_score_rel_diff']:.1e} " + extra)
    lines += ["", "The shipped rule is the 1e-2 window (`softpatch.TIE_RTOL`, 4 entries): a margin of ~4x under the 1e-4 parity "
              "target, where 3e-3 leaves almost none. Patch scores here are before upsampling and blur (the maps' "
              "differences are smaller)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--config", type=Path, default=ROOT / "configs/mvtec_softpatch_mobilenet.yaml")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "reports/softpatch_ties")
    args = ap.parse_args()
    os.chdir(ROOT)  # the config's relative data paths
    r, w, grid, n = topk_both(args.model, args.config, args.threads)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": str(args.model), "n_images": n, **analyse(r, w, grid)}
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    args.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
