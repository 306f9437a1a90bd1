"""Executors: shards, resume, the no-ray / bad-address errors, and (one local Ray) the same
results as the local executor, retries of killed tasks, sharded export."""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pyimgano_cli.app import app
from pyimgano_core.config import config_hash, load_config
from pyimgano_core.engine import CHUNK
from pyimgano_core.errors import ConfigError, DataError, ExecutionError
from pyimgano_core.execution import Job, LocalExecutor
from pyimgano_core.shards import parse_shard, shard_slice
from tests.helpers import write_config
from tests.ray_jobs import bad_data, die_until, thread_probe
from tests.synth import make_mvtec_tree

runner = CliRunner()
METRICS = ("metrics", "per_defect", "decisions", "counts")
# a small random-init CNN whose ONNX export passes its parity check (tests/test_onnx.py's)
ONNX_CNN = dict(backbone="mobilenet_v2", layers=["features.3", "features.6"], weights=None, image_size=48, crop=None,
                resize_mode="squash", coreset={"ratio": 0.5}, pretrain_embed_dim=40, target_embed_dim=32)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_mvtec_tree(root, "widget", n_train=8, n_test_good=3, seed=0)
    make_mvtec_tree(root, "gadget", n_train=8, n_test_good=3, defects={"crack": 3}, seed=1)
    return root


@pytest.fixture(scope="module")
def fitted(tree, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(config with one category and calibration, its model folder, a folder of 40 images)."""
    tmp = tmp_path_factory.mktemp("fitted")
    cfg = write_config(tmp / "c.yaml", tree, params=ONNX_CNN, calibration={"holdout_fraction": 0.25})
    cfg.write_text(cfg.read_text().replace("category: all", "category: widget"))
    assert run("fit", cfg, "--out", tmp / "m", "-q").exit_code == 0
    inbox = tmp / "inbox"
    for i, p in enumerate(sorted((tree / "widget/test").rglob("*.png")) * 5):
        (inbox / f"sub{i % 3}").mkdir(parents=True, exist_ok=True)
        (inbox / f"sub{i % 3}" / f"{i:03d}_{p.parent.name}.png").write_bytes(p.read_bytes())
    return cfg, tmp / "m/t", inbox


# ------------------------------------------------------------------------------ no Ray needed
def test_shard_slices_cover_every_item_exactly_once():
    for n_items in (0, 1, 7, 40, 101):
        items = list(range(n_items))
        for count in (1, 2, 3, 7, 16):
            for unit in (1, 16):
                parts = [shard_slice(items, i, count, unit) for i in range(count)]
                assert [x for p in parts for x in p] == items  # in order, no gap, no overlap
                assert all(p[0] % unit == 0 for p in parts if p)  # cut on the engine's chunks: the local batches
                full = [len(p) for p in parts[:-1]] + ([len(parts[-1])] if n_items % unit == 0 else [])
                assert not full or max(full) - min(full) <= unit
    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "1", "-1/3", "a/b", "1/0"):
        with pytest.raises(ConfigError, match="--shard expects I/N"):
            parse_shard(bad)


def test_export_shards_cover_the_folder_once(fitted, tmp_path):
    cfg, model, inbox = fitted
    for i in range(3):
        res = run("export-maps", cfg, "--model", model, "--input", inbox, "--shard", f"{i}/3", "--out", tmp_path, "-q")
        assert res.exit_code == 0, res.output
    rows = [json.loads(line)["path"] for f in sorted((tmp_path / "t/widget/export").glob("shard-*-of-0003/predictions.jsonl"))
            for line in f.read_text().splitlines()]
    files = sorted(str(p) for p in inbox.rglob("*.png"))
    assert len(rows) == len(files) == 40 and rows == files
    res = run("export-maps", cfg, "--model", model, "--input", inbox, "--shard", "3/3", "--out", tmp_path)
    assert res.exit_code == 2 and "--shard expects I/N" in res.output and len(res.output.strip().splitlines()) == 1


def test_resume_skips_reports_with_the_same_config_hash(tree, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tree, output={"html": False})
    assert run("eval", cfg, "--out", tmp_path, "-q").exit_code == 0
    reports = {c: tmp_path / f"t/{c}/report.json" for c in ("gadget", "widget")}
    before = {c: p.stat().st_mtime_ns for c, p in reports.items()}
    reports["widget"].write_text(reports["widget"].read_text().replace('"status": "ok"', '"status": "partial"', 1))
    res = run("eval", cfg, "--out", tmp_path, "--resume", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["resumed"] == ["gadget"] and set(summary["categories"]) == {"gadget", "widget"}
    assert reports["gadget"].stat().st_mtime_ns == before["gadget"] and reports["widget"].stat().st_mtime_ns != before["widget"]
    # the hash covers what changes results, not where a run executes or writes
    base = load_config(cfg)
    assert json.loads(reports["gadget"].read_text())["config_hash"] == config_hash(base)
    assert config_hash(load_config(cfg, ["detector.params.coreset.ratio=0.25"])) != config_hash(base)
    assert config_hash(load_config(cfg, ["execution.backend=ray", "output.root=elsewhere"])) == config_hash(base)


def test_without_ray_installed_one_line_names_the_extra(tree, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    res = run("eval", write_config(tmp_path / "c.yaml", tree), "--ray", "local", "--out", tmp_path)
    assert res.exit_code == 5 and 'pip install "pyimgano[ray]"' in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_unreachable_address_fails_fast_with_one_line(tree, tmp_path):
    pytest.importorskip("ray")
    assert not __import__("ray").is_initialized()  # runs before the module's Ray starts
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = write_config(tmp_path / "c.yaml", tree)
    for address in (f"ray://127.0.0.1:{port}", f"127.0.0.1:{port}"):
        _fails_fast_with_one_line(cfg, address, tmp_path, "cannot reach the Ray cluster")
    res = run("eval", cfg, "--ray", "nonsense", "--out", tmp_path)
    assert res.exit_code == 2 and "execution.address" in res.output


def test_silent_listener_fails_fast_with_one_line(tree, tmp_path):
    """A port that accepts TCP and never answers (here: a backlog nobody accepts from) made ray.init wait forever."""
    pytest.importorskip("ray")
    assert not __import__("ray").is_initialized()
    cfg = write_config(tmp_path / "c.yaml", tree)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)  # the kernel completes the handshakes; nothing is ever read or sent
        for address in (f"127.0.0.1:{s.getsockname()[1]}", f"ray://127.0.0.1:{s.getsockname()[1]}"):
            _fails_fast_with_one_line(cfg, address, tmp_path, "accepts connections but sends nothing within 3 s")


def _fails_fast_with_one_line(cfg, address: str, tmp_path, message: str) -> None:
    """``eval --ray ADDRESS`` gives up within seconds: exit 8, one line containing ``message``."""
    t0 = time.perf_counter()
    res = run("eval", cfg, "--ray", address, "--out", tmp_path)
    assert time.perf_counter() - t0 < 10
    assert res.exit_code == 8 and message in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_local_executor_pins_and_restores_the_thread_count():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    [one] = LocalExecutor(threads=1).run([Job("probe", thread_probe, {})])
    assert one.value["threads"] == 1 and torch.get_num_threads() == before
    [free] = LocalExecutor().run([Job("probe", thread_probe, {})])
    assert free.value["threads"] == before


# ------------------------------------------------------------------------------ one local Ray
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    import logging

    # Ray's memory monitor kills workers when the *machine* is nearly full, whoever fills it: that
    # would make these tests depend on other processes. Killed workers are tested explicitly.
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"
    # at least this process's torch thread count: a task reserves that many CPUs by default (as many threads as locally)
    kwargs = dict(num_cpus=max(2, __import__("torch").get_num_threads()), include_dashboard=False, logging_level=logging.ERROR,
                  log_to_driver=False)
    for attempt in range(3):  # Ray gives its raylet a fixed 30 s to register: an overloaded machine can miss it
        try:
            ray.init(**kwargs)
            break
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception for that
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()
    os.environ.pop("RAY_memory_monitor_refresh_ms", None)


def _metrics(folder: Path) -> dict:
    out = {}
    for report in sorted(folder.rglob("report.json")):
        doc = json.loads(report.read_text())
        scores = [json.loads(x)["score"] for x in (report.parent / "predictions.jsonl").read_text().splitlines()]
        out[str(report.relative_to(folder))] = ({k: doc[k] for k in METRICS}, doc["config_hash"], scores, doc["protocol"]["cpu_threads"])
    return out


def test_sweep_on_ray_gives_the_local_metrics(ray_cluster, tree, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tree)
    grid = ["--grid", "dataset.category=gadget,widget", "--grid", "detector.params.coreset.ratio=0.25"]
    res = run("sweep", cfg, *grid, "--out", tmp_path / "local", "--json")
    assert res.exit_code == 0, res.output
    res = run("sweep", cfg, *grid, "--ray", "local", "--out", tmp_path / "ray", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    names = ["t__category-gadget__coreset.ratio-0.25", "t__category-widget__coreset.ratio-0.25"]
    assert doc["executor"] == "ray" and [r["run"] for r in doc["runs"]] == names
    local, remote = _metrics(tmp_path / "local"), _metrics(tmp_path / "ray")
    assert sorted(local) == [f"{n}/{c}/report.json" for n, c in zip(names, ("gadget", "widget"))]
    assert local == remote  # identical metrics, per-defect metrics, counts and every image score
    table = (tmp_path / "ray/t-sweep/sweep.md").read_text()
    assert all(f"| {n} | {c} | 0.25 | {c} |" in table for n, c in zip(names, ("gadget", "widget"))), table
    rows = [[{k: v for k, v in r.items() if k != "summary"} for r in json.loads((tmp_path / f"{x}/t-sweep/sweep.json").read_text())["runs"]]
            for x in ("local", "ray")]
    assert rows[0] == rows[1]
    page = (tmp_path / "ray/t-sweep/index.html").read_text()
    assert all(f'href="../{n}/index.html"' in page for n in names) and (tmp_path / "ray" / names[0] / "index.html").is_file()


def test_ray_jobs_run_at_the_local_thread_count(ray_cluster):
    """Ray starts workers at OMP_NUM_THREADS=1; torch splits float32 sums by thread, so the
    same job at 1 and at 2 threads differs in its last bits (bottle scores 1.2e-4 apart)."""
    from pyimgano_core.execution import RayExecutor

    jobs = [Job("probe", thread_probe, {})]
    [local], [remote] = LocalExecutor().run(jobs), RayExecutor().run(jobs)
    assert remote.value == local.value  # the same thread count and bit for bit the same sums
    [local1], [remote1] = LocalExecutor(threads=1).run(jobs), RayExecutor(cpus_per_task=1).run(jobs)
    assert remote1.value == local1.value and local1.value["threads"] == 1
    cpus = int(ray_cluster.cluster_resources()["CPU"])
    with pytest.raises(ConfigError, match=f"no Ray node has that many CPUs \\(largest: {cpus}\\)"):
        RayExecutor(cpus_per_task=cpus + 1)


def test_killed_task_is_retried_then_reported_by_name(ray_cluster, tmp_path):
    from pyimgano_core.execution import RayExecutor

    jobs = [Job("steady", die_until, {"counter": str(tmp_path / "a"), "deaths": 0}),
            Job("flaky", die_until, {"counter": str(tmp_path / "b"), "deaths": 1}),
            Job("doomed", die_until, {"counter": str(tmp_path / "c"), "deaths": 99}),
            Job("bad-data", bad_data, {})]
    results = RayExecutor(max_retries=1).run(jobs)
    by = {r.name: r for r in results}
    assert [r.name for r in results] == ["steady", "flaky", "doomed", "bad-data"]
    assert by["steady"].value == {"runs": 1} and by["flaky"].value == {"runs": 2} and by["flaky"].attempts == 2
    assert isinstance(by["doomed"].error, ExecutionError) and by["doomed"].attempts == 2
    assert "worker died 2 time(s)" in str(by["doomed"].error) and (tmp_path / "c").read_text() == "2"
    assert isinstance(by["bad-data"].error, DataError) and by["bad-data"].attempts == 1  # user errors are not retried


def test_failed_category_is_named_in_the_summary_and_the_rest_kept(ray_cluster, tmp_path):
    root = tmp_path / "d"
    make_mvtec_tree(root, "widget")
    make_mvtec_tree(root, "gadget", seed=1)
    bad = root / "widget/test/scratch/000.png"
    bad.write_bytes(bad.read_bytes()[:200])  # the header reads (the dataset check passes); decoding fails in the task
    res = run("eval", write_config(tmp_path / "c.yaml", root, output={"html": False}), "--ray", "local", "--out", tmp_path / "o")
    assert res.exit_code == 3 and "[widget]" in res.output and "1 finished and kept" in res.output, res.output
    summary = json.loads((tmp_path / "o/t/summary.json").read_text())
    assert summary["status"] == "failed" and list(summary["categories"]) == ["gadget"]
    assert "000.png" in summary["failed"]["widget"]["error"] and summary["failed"]["widget"]["attempts"] == 1


def test_export_maps_on_ray_matches_local(ray_cluster, fitted, tmp_path):
    import numpy as np

    cfg, model, inbox = fitted
    for name, extra in (("local", []), ("ray", ["--ray", "local"])):
        res = run("export-maps", cfg, "--model", model, "--input", inbox, "--out", tmp_path / name, "-q", *extra)
        assert res.exit_code == 0, res.output
    local, remote = tmp_path / "local/t/widget/export", tmp_path / "ray/t/widget/export"
    rows_l = [json.loads(x) for x in (local / "predictions.jsonl").read_text().splitlines()]
    rows_r = [json.loads(x) for x in (remote / "predictions.jsonl").read_text().splitlines()]
    strip = ("files",)
    assert len(rows_l) == 40 and [{k: v for k, v in r.items() if k not in strip} for r in rows_l] == \
        [{k: v for k, v in r.items() if k not in strip} for r in rows_r]
    summary = json.loads((remote / "summary.json").read_text())
    assert summary["n_scored"] == 40 and len(summary["shards"]) == math.ceil(40 / CHUNK) and summary["failed_shards"] == {}
    pids = [s["worker_pid"] for s in summary["shards"].values()]
    for pid in set(pids):  # the model is loaded once per worker process, whatever the shards it scores
        assert sum(s["model_loaded"] for s in summary["shards"].values() if s["worker_pid"] == pid) == 1
    for a, b in zip(rows_l, rows_r):
        assert np.array_equal(np.load(a["files"]["map"]), np.load(b["files"]["map"]))


def test_export_maps_onnx_runtime_on_ray_matches_local(ray_cluster, fitted, tmp_path):
    pytest.importorskip("onnxruntime")
    _, run_folder, inbox = fitted
    model = run_folder / "widget/model"
    res = run("export-onnx", model)
    assert res.exit_code == 0, res.output
    for name, extra in (("local", []), ("ray", ["--ray", "local"])):  # no config: the model's own name and category
        res = run("export-maps", "--model", model, "--input", inbox, "--runtime", "onnx", "--out", tmp_path / name, "-q", *extra)
        assert res.exit_code == 0, res.output
    local, remote = (tmp_path / name / "t/widget/export" for name in ("local", "ray"))
    rows_l, rows_r = ([json.loads(x) for x in (f / "predictions.jsonl").read_text().splitlines()] for f in (local, remote))
    assert len(rows_l) == 40 and [(r["path"], r["score"], r["is_anomalous"]) for r in rows_l] == \
        [(r["path"], r["score"], r["is_anomalous"]) for r in rows_r]
    assert json.loads((remote / "summary.json").read_text())["n_scored"] == 40
