"""Report figures with matplotlib's Agg canvas (no pyplot, no display, no global backend switch).

Everything is drawn from saved data: report.json's ``curves`` and predictions.jsonl's scores.
"""
from __future__ import annotations

import io

import numpy as np

from ...optional import require

GOOD, BAD, THR = "#2a7ab9", "#d0542c", "#222222"


def _figure(width: float, height: float, rows: int, cols: int):
    require("matplotlib", extra="report")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _empty(ax, title: str, why: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="#777777")
    ax.set_xticks([])
    ax.set_yticks([])


def _roc(ax, curve: dict | None, title: str, auc: float | None) -> None:
    if not curve:
        return _empty(ax, title, "undefined (one class only)")
    ax.plot(curve["fpr"], curve["tpr"], color=BAD, lw=1.6, label=f"AUROC {auc:.3f}" if auc is not None else None)
    ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=0.8, ls="--")
    ax.set(title=title, xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    if auc is not None:
        ax.legend(loc="lower right")


def _pr(ax, curve: dict | None, title: str, ap: float | None, base: float | None) -> None:
    if not curve:
        return _empty(ax, title, "undefined (one class only)")
    ax.plot(curve["recall"], curve["precision"], color=BAD, lw=1.6, drawstyle="steps-post",
            label=f"AP {ap:.3f}" if ap is not None else None)
    if base is not None:
        ax.axhline(base, color="#bbbbbb", lw=0.8, ls="--", label=f"chance {base:.3f}")
    ax.set(title=title, xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left")


def _pro(ax, curve: dict | None, aupro: float | None) -> None:
    if not curve:
        return _empty(ax, "PRO (pixel regions)", "no ground-truth regions")
    limit = curve["fpr_limit"]
    ax.plot(curve["fpr"], curve["pro"], color=BAD, lw=1.6, label=f"AUPRO {aupro:.3f}" if aupro is not None else None)
    ax.fill_between(curve["fpr"], curve["pro"], color=BAD, alpha=0.12)
    ax.set(title=f"PRO to FPR {limit:g}", xlabel="false positive rate (defect-free pixels)", ylabel="per-region overlap",
           xlim=(0, limit), ylim=(0, 1.01))
    if aupro is not None:
        ax.legend(loc="lower right")


def _histogram(ax, labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> None:
    ok = np.isfinite(scores)
    labels, scores = labels[ok], scores[ok]
    if scores.size == 0:
        return _empty(ax, "image scores", "no scores")
    edges = np.histogram_bin_edges(scores, bins=min(40, max(10, scores.size // 4)))
    for value, colour, name in ((0, GOOD, "good"), (1, BAD, "defective")):
        sel = scores[labels == value]
        if sel.size:
            ax.hist(sel, bins=edges, color=colour, alpha=0.6, label=f"{name} ({sel.size})")
    if threshold is not None:
        ax.axvline(threshold, color=THR, lw=1.4, ls="--", label=f"threshold {threshold:.4g}")
    ax.set(title="image scores: good vs defective", xlabel="anomaly score", ylabel="images")
    ax.legend(loc="upper right")


def report_figure(report: dict, labels: np.ndarray, scores: np.ndarray) -> bytes:
    """One PNG: image ROC, PR and score histogram (top); pixel ROC, PR and PRO (bottom)."""
    curves = report.get("curves") or {}
    img, pix = curves.get("image") or {}, curves.get("pixel") or {}
    m = report.get("metrics", {})
    thr = (report.get("decisions") or {}).get("thresholds") or {}
    fig, ax = _figure(13.0, 7.6, 2, 3)
    rate = float(np.mean(labels == 1)) if labels.size else None
    _roc(ax[0, 0], img.get("roc"), "image ROC", m.get("image_auroc"))
    _pr(ax[0, 1], img.get("pr"), "image PR", m.get("image_ap"), rate)
    _histogram(ax[0, 2], labels, scores, thr.get("image"))
    if pix:
        _roc(ax[1, 0], pix.get("roc"), "pixel ROC", m.get("pixel_auroc"))
        n_pos = pix["pr"]["precision"][-1] if pix.get("pr") else None
        _pr(ax[1, 1], pix.get("pr"), "pixel PR", m.get("pixel_ap"), n_pos)
        _pro(ax[1, 2], pix.get("pro"), m.get("aupro"))
    else:
        for j, title in enumerate(("pixel ROC", "pixel PR", "PRO")):
            _empty(ax[1, j], title, "no pixel ground truth evaluated")
    return _png(fig)
