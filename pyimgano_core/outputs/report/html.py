"""``report.html``: one self-contained page per category, built from saved files only.

Reads ``report.json``, ``predictions.jsonl`` and ``report_assets/*.png`` of a category
folder; images are inlined as base64 PNG, styles are inline, there is no script and no
network access, so the file can be mailed or attached to a CI job as it is.
"""
from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path

import numpy as np

from ...errors import DataError
from . import METRIC_NAMES
from ..files import write_text
from .plots import report_figure

METRICS = tuple(METRIC_NAMES.items())
GROUPS = (("highest_scoring_good", "Highest-scoring good images (false-alarm candidates)"),
          ("lowest_scoring_defective", "Lowest-scoring defective images (miss candidates)"),
          ("worst_localised", "Worst-localised defects (lowest per-image AUPRO)"))

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
main{max-width:1320px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.sub{color:#555;margin:0 0 12px}
table{border-collapse:collapse;background:#fff;margin:4px 0 8px}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:right}th{background:#f0f0f3}
td:first-child,th:first-child{text-align:left}tr.all td{font-weight:600}
img.fig{max-width:100%;height:auto;background:#fff;border:1px solid #ddd}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(392px,1fr));gap:12px}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:6px}figure img{display:block;max-width:100%}
figcaption{font-size:12px;color:#333;margin-top:4px;word-break:break-all}
pre{background:#fff;border:1px solid #ddd;padding:10px;overflow:auto;font-size:12px;max-height:480px}
.note{color:#666;font-size:12px}
"""


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def load_scores(cat_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = [json.loads(line) for line in (cat_dir / "predictions.jsonl").read_text().splitlines() if line.strip()]
    return (np.array([r["label"] for r in rows], dtype=np.int64),
            np.array([np.nan if r["score"] is None else r["score"] for r in rows], dtype=np.float64))


def _metrics_table(report: dict) -> str:
    head = "".join(f"<th>{name}</th>" for _, name in METRICS)
    rows = [f'<tr class="all"><td>all</td><td>{report["counts"]["test"]}</td>'
            + "".join(f"<td>{_fmt(report['metrics'].get(k))}</td>" for k, _ in METRICS) + "</tr>"]
    for d, m in report.get("per_defect", {}).items():
        rows.append(f"<tr><td>{escape(d)}</td><td>{m['n']}</td>" + "".join(f"<td>{_fmt(m.get(k))}</td>" for k, _ in METRICS) + "</tr>")
    note = ('<p class="note">Per-defect rows: the good test images plus that defect type. '
            f'{escape(str(report.get("protocol", {}).get("aupro", "")))}.</p>')
    return f"<table><tr><th>defect</th><th>n</th>{head}</tr>{''.join(rows)}</table>{note}"


def _decisions(report: dict) -> str:
    dec = report.get("decisions")
    if not dec:
        return '<p class="note">No calibrated thresholds (add a <code>calibration</code> section to get decisions).</p>'
    i, p, thr = dec["image"], dec.get("pixel"), dec["thresholds"]
    rows = [("image", f"{thr['image']:.5g}", i), ("pixel", "-" if thr.get("pixel") is None else f"{thr['pixel']:.5g}", p)]
    body = "".join(f"<tr><td>{name}</td><td>{t}</td>" + "".join(f"<td>{_fmt(s.get(k))}</td>" for k in ("precision", "recall", "f1", "iou"))
                   + "</tr>" for name, t, s in rows if s)
    oracle = dec.get("oracle_f1_max_NOT_a_deployable_threshold", {})
    return ("<table><tr><th>level</th><th>threshold</th><th>precision</th><th>recall</th><th>F1</th><th>IoU</th></tr>"
            f"{body}</table><p class='note'>Thresholds from {thr['n_images']} held-out normal training images; "
            f"test good images flagged: {_fmt(i.get('test_good_fpr'))}. Oracle F1-max (not deployable): "
            + ", ".join(f"{escape(k)} {_fmt(v)}" for k, v in oracle.items()) + ".</p>")


def _worst(cat_dir: Path, report: dict) -> str:
    worst = report.get("worst_cases")
    if not worst:
        return '<p class="note">No worst cases recorded in this report.</p>'
    thr = (report.get("decisions") or {}).get("thresholds") or {}
    image_thr = thr.get("image")
    parts = [f'<p class="note">Left: image with the ground-truth contour (green); right: anomaly map over the image, '
             f'colour range {worst["colour_range"][0]:.4g} (blue) to {worst["colour_range"][1]:.4g} (red), '
             f'{escape(worst.get("colour_range_from", ""))}'
             + (f'; pixel threshold {worst["pixel_threshold"]:.4g} on the bar' if worst.get("pixel_threshold") is not None else "")
             + (f'; image threshold {image_thr:.4g} for the scores below' if image_thr is not None else "")
             + f'. Per-image AUPRO: {escape(worst["per_image_aupro"])}.</p>']
    bar = worst.get("colour_bar")
    if bar and (cat_dir / bar).is_file():
        parts.append(f'<p><img class="colour-bar" src="{_b64((cat_dir / bar).read_bytes())}" alt="colour bar: anomaly map value"></p>')
    for key, title in GROUPS:
        rows = worst.get(key) or []
        parts.append(f"<h3>{escape(title)}</h3>")
        if not rows:
            parts.append('<p class="note">none</p>')
            continue
        tiles = []
        for r in rows:
            decision = "" if image_thr is None else (" (above image threshold)" if r["score"] >= image_thr else " (below image threshold)")
            caption = f"{escape(r['defect_type'])} · score {r['score']:.4g}{decision}" + (
                f" · AUPRO {r['aupro']:.3f}" if r.get("aupro") is not None else "")
            picture = ""
            if r.get("image") and (cat_dir / r["image"]).is_file():
                picture = f'<img src="{_b64((cat_dir / r["image"]).read_bytes())}" alt="{escape(Path(r["path"]).name)}">'
            tiles.append(f"<figure>{picture}<figcaption>{caption}<br>{escape(r['path'])}</figcaption></figure>")
        parts.append(f'<div class="grid">{"".join(tiles)}</div>')
    return "".join(parts)


def _kv_table(d: dict) -> str:
    return "<table>" + "".join(f"<tr><td>{escape(str(k))}</td><td style='text-align:left'>{escape(readable(k, v))}</td></tr>"
                               for k, v in d.items() if v is not None) + "</table>"


def readable(key: str, value) -> str:
    """A protocol value as a sentence fragment, never a raw Python dict or list."""
    if key == "model_input" and isinstance(value, dict):
        size, crop, multiple = value.get("size"), value.get("crop"), value.get("multiple")
        how = {"squash": "resized to", "shorter_side": "shorter side resized to"}.get(value.get("mode"), f"{value.get('mode')} to")
        text = f"{how} {_pair(size)}" if size is not None else "original size"
        text += f", centre crop {_pair(crop)}" if crop else ", no crop (the whole image)"
        return text + (f", sides cropped to multiples of {multiple}" if multiple else "")
    if isinstance(value, dict):
        return "; ".join(f"{k.replace('_', ' ')}: {readable(k, v)}" for k, v in value.items() if v is not None)
    if isinstance(value, (list, tuple)):
        return ", ".join(readable(key, v) for v in value)
    return str(value)


def _pair(v) -> str:
    return f"{v[0]}x{v[1]}" if isinstance(v, (list, tuple)) and len(v) == 2 else (f"{v}x{v}" if isinstance(v, int) else str(v))


def render(cat_dir: Path) -> str:
    """The page for one category folder, as a string."""
    cat_dir = Path(cat_dir)
    path = cat_dir / "report.json"
    if not path.is_file():
        raise DataError(f"No report.json in {cat_dir} (run 'pyimgano eval' first)")
    report = json.loads(path.read_text())
    labels, scores = load_scores(cat_dir)
    figure = _b64(report_figure(report, labels, scores))
    c, t = report["counts"], report.get("timing", {})
    title = f"{report['name']} / {report['category']}"
    counts = {"train images": c.get("train"), "fitted on": c.get("fit"), "calibration holdout": c.get("calibration_holdout"),
              "test images": c.get("test"), "test good": c.get("test_good"), "test defective": c.get("test_anomalous"),
              "pixel-evaluated": c.get("pixel_evaluated"), "fit s": _fmt(t.get("fit_s")), "predict s / image": _fmt(t.get("predict_s_per_image")),
              "metrics s": _fmt(t.get("metrics_s")), "peak RSS MB": _fmt(t.get("peak_rss_mb"))}
    notes = report.get("notes") or {}
    notes = _kv_table(notes) if isinstance(notes, dict) else "".join(f"<p>{escape(str(n))}</p>" for n in notes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<link rel="icon" href="data:,"><title>{escape(title)} — pyimgano report</title><style>{CSS}</style></head>
<body><main>
<h1>{escape(title)}</h1>
<p class="sub">detector <b>{escape(report['detector'])}</b> · status {escape(report.get('status', '?'))} ·
{c['test']} test images ({c['test_good']} good, {c['test_anomalous']} defective) · pyimgano {escape(report.get('versions', {}).get('pyimgano', '?'))}</p>
<h2>Metrics</h2>{_metrics_table(report)}
<h2>Decisions at calibrated thresholds</h2>{_decisions(report)}
<h2>Curves and score distribution</h2><img class="fig" src="{figure}" alt="ROC, PR, PRO curves and score histogram">
<h2>Worst cases</h2>{_worst(cat_dir, report)}
<h2>Protocol</h2>{_kv_table(report.get('protocol', {}))}{notes}
<h2>Counts and timing</h2>{_kv_table(counts)}
<h2>Config</h2><pre>{escape(json.dumps(report.get('config', {}), indent=2))}</pre>
<h2>Versions</h2>{_kv_table(report.get('versions', {}))}
</main></body></html>
"""


def write_page(cat_dir: Path) -> Path:
    return write_text(Path(cat_dir) / "report.html", render(cat_dir))
