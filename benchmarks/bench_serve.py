"""pyimgano serve on MVTec AD bottle: loopback HTTP latency and throughput, a soak, runtimes, lean install.

    python benchmarks/bench_serve.py --pca-ivf MODEL --exact MODEL [--only http soak runtimes lean]

MODEL folders are fitted beforehand (never committed), e.g. into /tmp:

    pyimgano fit configs/mvtec_patchcore_mobilenet.yaml --set calibration.holdout_fraction=0.1 \\
        --set detector.params.knn.kind=pca_ivf --set name=readme_pca_ivf --out /tmp/serve_models
    pyimgano fit configs/mvtec_patchcore_mobilenet.yaml --set calibration.holdout_fraction=0.1 \\
        --set name=readme_exact --out /tmp/serve_models
    pyimgano export-onnx /tmp/serve_models/readme_exact/bottle/model     # onnx / openvino runtimes
    pyimgano quantize /tmp/serve_models/readme_exact/bottle/model        # int8 runtimes (if it passes)

Sections (reports/serve.json + serve.md):

1. http: the README model (pca_ivf, calibrated) served by `pyimgano serve` in a child process;
   cold start = process start to the first 200 of /readyz. One client alternates, per bottle
   test image, in-process ``load_model(...).predict(path)`` and POST /v1/predict with the
   image's PNG bytes (keep-alive connection), so both see the same machine load; median / p95.
   Throughput: images/s of 1 client vs 8 concurrent clients against the same server, and 8
   clients against a second server with --max-batch 1 (what concurrency alone gives).
2. soak: 5,000 requests from 4 clients, mixing valid good-part images, defective-part images and
   malformed bodies (seeded); counts per status, every malformed answer must be a 4xx with a
   JSON message, server RSS after warm-up vs at the end.
3. runtimes: the exact-search model (the one export-onnx takes) on torch, onnx, openvino and the
   int8 graphs; median predict(path) over 20 test images, the runtimes alternating per image in
   one process; score / map parity and decision flips against torch on all 83 test images.
4. lean: a fresh venv with ``pip install ".[serve]"``: install time, size, whether torch is
   importable, and cold start to ready serving the exported graph with --runtime onnx.

The machine's 2 cores are shared with other jobs: compare numbers within a run (ratios).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOTTLE = ROOT.parent / "shared/data/mvtec_ad/bottle"
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def summary_ms(values: list[float]) -> dict:
    return {"median_ms": round(1000 * statistics.median(values), 2), "p95_ms": round(1000 * pct(values, 0.95), 2), "n": len(values)}


def test_images() -> list[Path]:
    return sorted((BOTTLE / "test").rglob("*.png"))


class Server:
    """``pyimgano serve`` in a child process on a free port; ``ready_s``: start to /readyz 200."""

    def __init__(self, *args: str, python: str = sys.executable, env: dict | None = None):
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([python, "-m", "pyimgano_cli", "serve", "--port", "0", *args], cwd=ROOT if python == sys.executable else "/tmp",
                                     env=env or ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = ""
        for line in self.proc.stderr:
            if "listening on" in line:
                break
        if "listening on" not in line:
            raise RuntimeError(f"server did not start: {line}{self.proc.stderr.read()[-2000:]}")
        self.host, self.port = line.split("http://")[1].split(" ")[0].split(":")
        self.port = int(self.port)
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained
        while True:
            try:
                if self.request("GET", "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("server exited before ready")
            time.sleep(0.02)
        self.ready_s = time.perf_counter() - t0

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=120)

    def request(self, method: str, path: str, body: bytes | None = None, ctype: str = "image/png", conn=None):
        c = conn or self.connection()
        c.request(method, path, body=body, headers={"Content-Type": ctype} if body is not None else {})
        r = c.getresponse()
        data = r.read()
        if conn is None:
            c.close()
        return r.status, data

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(60)


def fan_out(server: Server, clients: int, n: int, one, results: list | None = None) -> list:
    """Requests 0..n-1 from ``clients`` threads, each on its own keep-alive connection:
    ``one(i, conn) -> (result, conn)`` (it may replace a closed connection). Results are appended to
    ``results`` as they finish (a sampler may watch its length), in finishing order."""
    lock, next_i = threading.Lock(), [0]
    results = [] if results is None else results

    def run():
        conn = server.connection()
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= n:
                break
            result, conn = one(i, conn)
            with lock:
                results.append(result)
        conn.close()

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def throughput(server: Server, bodies: list[bytes], clients: int, n: int) -> dict:
    """n POSTs from ``clients`` threads (each its own keep-alive connection): images/s, statuses."""
    def one(i, conn):
        t = time.perf_counter()
        status, _ = server.request("POST", "/v1/predict", bodies[i % len(bodies)], conn=conn)
        return (status, time.perf_counter() - t), conn

    t0 = time.perf_counter()
    results = fan_out(server, clients, n, one)
    wall = time.perf_counter() - t0
    codes, lat = [c for c, _ in results], [s for _, s in results]
    return {"clients": clients, "requests": n, "wall_s": round(wall, 2), "images_per_s": round(n / wall, 2),
            "non_200": sum(c != 200 for c in codes), **summary_ms(lat)}


def batch_sizes(server: Server) -> dict:
    _, text = server.request("GET", "/metrics")
    out = {}
    for line in text.decode().splitlines():
        if line.startswith("pyimgano_batch_size_sum") or line.startswith("pyimgano_batch_size_count"):
            out[line.split("{")[0].rsplit("_", 1)[1]] = float(line.rsplit(" ", 1)[1])
    return {"forward_passes": int(out.get("count", 0)), "mean_batch": round(out["sum"] / out["count"], 2) if out.get("count") else None}


# ------------------------------------------------------------------------------------ http
def bench_http(model: Path, n_latency: int, n_tput: int) -> dict:
    from pyimgano_core.infer import load_model

    paths = test_images()
    bodies = [p.read_bytes() for p in paths]
    server = Server("--model", str(model))
    inspector = load_model(model)
    for p in paths[:3]:
        inspector.predict(p)
    conn = server.connection()
    for b in bodies[:3]:
        server.request("POST", "/v1/predict", b, conn=conn)
    inproc, http_lat, parity = [], [], 0.0
    order = [i % len(paths) for i in range(n_latency)]
    for i in order:  # alternate: both see the same load
        t = time.perf_counter()
        r = inspector.predict(paths[i])
        inproc.append(time.perf_counter() - t)
        t = time.perf_counter()
        status, data = server.request("POST", "/v1/predict", bodies[i], conn=conn)
        http_lat.append(time.perf_counter() - t)
        assert status == 200, data
        parity = max(parity, abs(json.loads(data)["score"] - r.score) / abs(r.score))
    conn.close()
    ready_s = server.ready_s
    nobatch = Server("--model", str(model), "--max-batch", "1")
    rounds: dict[str, list[dict]] = {"1": [], "8": [], "8_max_batch_1": []}
    for _ in range(3):  # alternate the three set-ups: each sees the same (shared) machine
        rounds["1"].append(throughput(server, bodies, 1, n_tput // 2))
        rounds["8"].append(throughput(server, bodies, 8, n_tput))
        rounds["8_max_batch_1"].append(throughput(nobatch, bodies, 8, n_tput))
    batches = batch_sizes(server)
    code = server.stop()
    nobatch.stop()
    med = {k: statistics.median(r["images_per_s"] for r in v) for k, v in rounds.items()}

    def pick(k):  # the round with the median rate, with its latencies
        return sorted(rounds[k], key=lambda r: r["images_per_s"])[1]

    res = {"model": str(model), "images": "bottle test PNGs (900x900)", "cold_start_to_ready_s": round(ready_s, 2),
           "exit_code_after_sigterm": code, "in_process_predict_path": summary_ms(inproc), "http_1_client": summary_ms(http_lat),
           "http_minus_in_process_median_ms": round(1000 * (statistics.median(http_lat) - statistics.median(inproc)), 2),
           "max_score_rel_diff_http_vs_in_process": parity,
           "throughput_1_client": pick("1"), "throughput_8_clients": pick("8"), "throughput_8_clients_max_batch_1": pick("8_max_batch_1"),
           "throughput_rounds_images_per_s": {k: [r["images_per_s"] for r in v] for k, v in rounds.items()},
           "batches_whole_run": batches,
           "speedup_8_vs_1": round(med["8"] / med["1"], 2),
           "speedup_8_batched_vs_8_unbatched": round(med["8"] / med["8_max_batch_1"], 2)}
    return res


# ------------------------------------------------------------------------------------ soak
def png_header(w: int, h: int) -> bytes:
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))


def malformed_bodies(good: bytes) -> dict[str, tuple[bytes, str]]:
    import cv2
    import numpy as np

    one = cv2.imencode(".png", np.zeros((1, 1, 3), np.uint8))[1].tobytes()
    return {"not_an_image": (b"hello, not an image" * 10, "image/png"), "truncated_png": (good[: len(good) // 3], "image/png"),
            "1x1": (one, "image/png"), "30000x30000_header": (png_header(30000, 30000) + b"\0" * 64, "image/png"),
            "empty": (b"", "image/png"), "wrong_content_type": (good[:2000], "text/plain"),
            "corrupt_jpeg": (b"\xff\xd8\xff\xe0" + os.urandom(500) + b"\xff\xd9", "image/jpeg")}


def bench_soak(model: Path, n: int, clients: int = 4, seed: int = 0) -> dict:
    paths = test_images()
    good = [p.read_bytes() for p in paths if p.parent.name == "good"]
    bad = [p.read_bytes() for p in paths if p.parent.name != "good"]
    bad_kinds = malformed_bodies(good[0])
    rng = random.Random(seed)
    plan = []
    for _ in range(n):
        u = rng.random()
        if u < 0.35:
            plan.append(("good", rng.choice(good), "image/png"))
        elif u < 0.6:
            plan.append(("defective", rng.choice(bad), "image/png"))
        else:
            k = rng.choice(sorted(bad_kinds))
            plan.append((k, *bad_kinds[k]))
    server = Server("--model", str(model))
    rows: list = []

    def one(i, conn):
        kind, body, ctype = plan[i]
        try:
            status, data = server.request("POST", "/v1/predict", body, ctype, conn=conn)
        except (OSError, http.client.HTTPException):  # the server closed the connection (e.g. after an error answer)
            conn.close()
            conn = server.connection()
            status, data = server.request("POST", "/v1/predict", body, ctype, conn=conn)
        try:
            msg = json.loads(data).get("error")
        except ValueError:
            msg = None
        return (kind, status, msg), conn

    def phase(count: int) -> None:
        fan_out(server, clients, count, one, rows)

    # warm-up: the first 200 requests of the plan, same clients (allocator arenas and caches of
    # every thread settle); the soak proper then replays the whole plan of n requests
    phase(min(200, n))
    rows.clear()
    rss0, samples, done = server.rss_mb(), [], threading.Event()

    def sample():
        while not done.wait(2.0):
            samples.append((len(rows), round(server.rss_mb(), 1)))

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    phase()
    wall = time.perf_counter() - t0
    done.set()
    rss1 = server.rss_mb()
    code = server.stop()
    by_kind: dict = {}
    for kind, status, msg in rows:
        d = by_kind.setdefault(kind, {"n": 0, "status": {}, "messages": set()})
        d["n"] += 1
        d["status"][str(status)] = d["status"].get(str(status), 0) + 1
        if msg:
            d["messages"].add(msg[:160])
    valid = [r for r in rows if r[0] in ("good", "defective")]
    malformed = [r for r in rows if r[0] not in ("good", "defective")]
    return {"requests": len(rows), "clients": clients, "wall_s": round(wall, 1),
            "valid_5xx": sum(s >= 500 for _, s, _ in valid), "valid_non_200": sum(s != 200 for _, s, _ in valid),
            "malformed_not_4xx_with_message": sum(not (400 <= s < 500 and m) for _, s, m in malformed),
            "rss_after_warmup_mb": round(rss0, 1), "rss_end_mb": round(rss1, 1), "rss_growth_mb": round(rss1 - rss0, 1),
            "rss_max_mb": max([rss1] + [r for _, r in samples]), "rss_samples_requests_mb": samples[:: max(1, len(samples) // 20)],
            "exit_code_after_sigterm": code,
            "by_kind": {k: {"n": v["n"], "status": v["status"], "messages": sorted(v["messages"])[:3]} for k, v in sorted(by_kind.items())}}


# ------------------------------------------------------------------------------------ runtimes
def bench_runtimes(exact: Path, pca_ivf: Path | None, n_timing: int) -> dict:
    """The int8 graph is built here whether or not ``pyimgano quantize`` would keep it (its gate is
    reported), so a refused int8 still gets its speed and test-set flips measured."""
    from pyimgano_core.deploy.onnx_export import compare
    from pyimgano_core.deploy.onnx_runtime import build_onnx_model, read_doc
    from pyimgano_core.deploy.quantize import INT8_MAP_RTOL, INT8_SCORE_RTOL, int8_graph
    from pyimgano_core.deploy.runtimes import make_session
    from pyimgano_core.infer import Inspector, load_model

    inspectors = {rt: load_model(exact, runtime=rt) for rt in ("torch", "onnx", "openvino")}
    t0 = time.perf_counter()
    data, section, fp32, q_ort, calib = int8_graph(exact)
    quantize_s = time.perf_counter() - t0
    doc = read_doc(exact)
    gate = compare(fp32, q_ort, calib)
    passed = gate["max_score_rel_diff"] <= INT8_SCORE_RTOL and gate["max_map_rel_diff"] <= INT8_MAP_RTOL and not gate["decision_flips"]
    inspectors["onnx-int8"] = Inspector(q_ort)
    inspectors["openvino-int8"] = Inspector(build_onnx_model(doc, {**doc["onnx"], **section}, make_session(data, "openvino")))
    if pca_ivf is not None:
        inspectors["torch (pca_ivf model)"] = load_model(pca_ivf)
    paths = test_images()
    times = {k: [] for k in inspectors}
    for k, insp in inspectors.items():
        insp.predict(paths[0])
    for p in paths[1 : 1 + n_timing]:
        for k, insp in inspectors.items():
            t = time.perf_counter()
            insp.predict(p)
            times[k].append(time.perf_counter() - t)
    out = {"model": str(exact), "timing": {k: summary_ms(v) for k, v in times.items()}, "parity_vs_torch": {},
           "int8": {"method": section["method"], "quantize_s": round(quantize_s, 1), "calibration_images": section["calibration_images"],
                    "gate_vs_float32_on_calibration_images": gate, "score_rtol": INT8_SCORE_RTOL, "map_rtol": INT8_MAP_RTOL,
                    "gate_passed": passed}}
    ref = inspectors["torch"].model
    for rt in ("onnx", "openvino", "onnx-int8", "openvino-int8"):
        out["parity_vs_torch"][rt] = compare(ref, inspectors[rt].model, paths)
    return out


# ------------------------------------------------------------------------------------ lean
def bench_lean(venv: Path, exact: Path) -> dict:
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    t0 = time.perf_counter()
    pip = subprocess.run([str(venv / "bin/pip"), "install", "--no-cache-dir", f"{ROOT}[serve]"], capture_output=True, text=True)
    install_s = time.perf_counter() - t0
    if pip.returncode != 0:
        raise RuntimeError(pip.stderr[-2000:])
    size = int(subprocess.run(["du", "-sb", str(venv)], capture_output=True, text=True).stdout.split()[0])
    py = str(venv / "bin/python")
    torch_check = subprocess.run([py, "-c", "import torch"], capture_output=True, text=True, cwd="/tmp")
    fit = subprocess.run([str(venv / "bin/pyimgano"), "fit", str(ROOT / "configs/mvtec_patchcore_mobilenet.yaml"), "--out", "/tmp/lean_fit"],
                         capture_output=True, text=True, cwd="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    server = Server("--model", str(exact), "--runtime", "onnx", python=py, env=env)
    status, data = server.request("POST", "/v1/predict", test_images()[0].read_bytes())
    code = server.stop()
    return {"venv": str(venv), "pip_install_s": round(install_s, 1), "venv_size_mb": round(size / 2**20, 1),
            "packages": sorted(line.split("==")[0] for line in subprocess.run([str(venv / "bin/pip"), "freeze"], capture_output=True,
                                                                             text=True).stdout.split()),
            "torch_importable": torch_check.returncode == 0, "fit_without_torch": {"exit_code": fit.returncode, "stderr": fit.stderr.strip()},
            "cold_start_to_ready_onnx_s": round(server.ready_s, 2), "first_predict_status": status,
            "first_predict": json.loads(data), "exit_code_after_sigterm": code}


def write_md(res: dict, path: Path) -> None:
    lines = ["# pyimgano serve on MVTec AD bottle (2 shared cores, loopback)", "",
             "`python benchmarks/bench_serve.py` (see its docstring); numbers of one run, compare within it. "
             f"Load average after the last section: {', '.join(f'{x:.1f}' for x in res.get('load_average_after', []))} "
             "(the 2 cores are shared with other jobs).", ""]
    h = res.get("http")
    if h:
        lines += ["## HTTP vs in-process (README model, pca_ivf, calibrated)", "",
                  "| | median ms | p95 ms |", "| --- | --- | --- |",
                  f"| in-process predict(path) | {h['in_process_predict_path']['median_ms']} | {h['in_process_predict_path']['p95_ms']} |",
                  f"| POST /v1/predict, 1 client | {h['http_1_client']['median_ms']} | {h['http_1_client']['p95_ms']} |", "",
                  f"HTTP adds **{h['http_minus_in_process_median_ms']} ms** at the median. Cold start to ready: "
                  f"**{h['cold_start_to_ready_s']} s**.", "",
                  "| clients | images/s | median ms | p95 ms |", "| --- | --- | --- | --- |"]
        for k in ("throughput_1_client", "throughput_8_clients", "throughput_8_clients_max_batch_1"):
            t = h[k]
            lines.append(f"| {t['clients']}{' (--max-batch 1)' if k.endswith('batch_1') else ''} | {t['images_per_s']} | {t['median_ms']} | {t['p95_ms']} |")
        lines += ["", f"8 clients vs 1: **{h['speedup_8_vs_1']}x**; batched vs unbatched at 8 clients: {h['speedup_8_batched_vs_8_unbatched']}x "
                  f"(mean batch over the whole run {h['batches_whole_run']['mean_batch']}; medians of 3 alternating rounds).", ""]
    s = res.get("soak")
    if s:
        lines += ["## Soak", "", f"{s['requests']} requests, {s['clients']} clients, {s['wall_s']} s: 5xx on valid images **{s['valid_5xx']}**, "
                  f"malformed answers that were not a 4xx with a message **{s['malformed_not_4xx_with_message']}**, server RSS "
                  f"{s['rss_after_warmup_mb']} -> {s['rss_end_mb']} MB (**{s['rss_growth_mb']:+} MB**), exit code after SIGTERM {s['exit_code_after_sigterm']}.", "",
                  "| kind | n | statuses | message (first) |", "| --- | --- | --- | --- |"]
        for k, v in s["by_kind"].items():
            lines.append(f"| {k} | {v['n']} | {v['status']} | {(v['messages'] or [''])[0]} |")
        lines.append("")
    r = res.get("runtimes")
    if r:
        lines += ["## Runtimes (exact-search README model; predict(path), alternating per image)", "",
                  "| runtime | median ms | p95 ms | max score rel diff | max map rel diff | decision flips (83) |", "| --- | --- | --- | --- | --- | --- |"]
        for k, t in r["timing"].items():
            p = r["parity_vs_torch"].get(k)
            lines.append(f"| {k} | {t['median_ms']} | {t['p95_ms']} | " + (f"{p['max_score_rel_diff']:.2g} | {p['max_map_rel_diff']:.2g} | {p['decision_flips']} |" if p else "- | - | - |"))
        q = r["int8"]
        g = q["gate_vs_float32_on_calibration_images"]
        lines += ["", f"int8 ({q['method']}; {q['quantize_s']} s): against the float32 graph on {g['n_images']} calibration images the "
                  f"largest score difference is {g['max_score_rel_diff']:.3g} and map {g['max_map_rel_diff']:.3g} (tolerances "
                  f"{q['score_rtol']}, {q['map_rtol']}), {g['decision_flips']} flips: `pyimgano quantize` "
                  + ("keeps it." if q["gate_passed"] else "**refuses** it (the rows above measure the refused graph)."), ""]
    le = res.get("lean")
    if le:
        lines += ["## Lean install (`pip install \".[serve]\"`, fresh venv)", "",
                  f"pip install {le['pip_install_s']} s, venv {le['venv_size_mb']} MB, torch importable: {le['torch_importable']}, "
                  f"cold start to ready (--runtime onnx): {le['cold_start_to_ready_onnx_s']} s, first predict {le['first_predict_status']}; "
                  f"`pyimgano fit` there: exit {le['fit_without_torch']['exit_code']}, `{le['fit_without_torch']['stderr']}`", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pca-ivf", type=Path, required=True)
    ap.add_argument("--exact", type=Path, required=True)
    ap.add_argument("--only", nargs="*", default=["http", "soak", "runtimes", "lean"])
    ap.add_argument("--n-latency", type=int, default=60)
    ap.add_argument("--n-tput", type=int, default=96)
    ap.add_argument("--n-soak", type=int, default=5000)
    ap.add_argument("--n-timing", type=int, default=20)
    ap.add_argument("--lean-venv", type=Path, default=Path("/tmp/pyimgano-lean"))
    ap.add_argument("--out", type=Path, default=ROOT / "reports/serve.json")
    a = ap.parse_args()
    res = json.loads(a.out.read_text()) if a.out.exists() else {}
    for section in a.only:
        t0 = time.perf_counter()
        if section == "http":
            res["http"] = bench_http(a.pca_ivf, a.n_latency, a.n_tput)
        elif section == "soak":
            res["soak"] = bench_soak(a.pca_ivf, a.n_soak)
        elif section == "runtimes":
            res["runtimes"] = bench_runtimes(a.exact, a.pca_ivf, a.n_timing)
        elif section == "lean":
            res["lean"] = bench_lean(a.lean_venv, a.exact)
        res.setdefault("section_s", {})[section] = round(time.perf_counter() - t0, 1)
        res["load_average_after"] = os.getloadavg()
        a.out.write_text(json.dumps(res, indent=2, default=str))
        write_md(res, a.out.with_suffix(".md"))
        print(f"{section}: done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
