"""Configs and model folders written for the flat patch-kNN keys keep working for this release.

Before the memory bank's parts had their own sub-models, their options were flat detector
parameters (``coreset_ratio: 0.1``, ``knn_index: pca_ivf``, ``ivf_nprobe: 8``, ...). Each is
rewritten to its nested path here, with a note naming the new path (the config loader prints
one warning line per key). Model folders saved before the change hold every flat key at its
value; options of another kind at their old default are dropped, since the old validators
forced exactly that.
"""
from __future__ import annotations

from typing import Any

# old key -> (section, new field)
MOVED = {
    "coreset_ratio": ("coreset", "ratio"), "coreset_method": ("coreset", "method"),
    "coreset_projection_dim": ("coreset", "projection_dim"), "coreset_chunk_points": ("coreset", "chunk_points"),
    "knn_index": ("knn", "kind"), "knn_backend": ("knn", "kind"),
    "hnsw_m": ("knn", "m"), "hnsw_ef_construction": ("knn", "ef_construction"), "hnsw_ef_search": ("knn", "ef_search"),
    "ivf_nlist": ("knn", "nlist"), "ivf_nprobe": ("knn", "nprobe"), "pca_dim": ("knn", "pca_dim"),
    "rerank_candidates": ("knn", "rerank_candidates"),
}
# what the flat model forced when an option did not apply
OLD_DEFAULTS = {"coreset_projection_dim": 128, "coreset_chunk_points": 200_000, "knn_backend": "torch", "hnsw_m": 32,
                "hnsw_ef_construction": 80, "hnsw_ef_search": 64, "ivf_nlist": None, "ivf_nprobe": 8, "pca_dim": 64,
                "rerank_candidates": 16}
# the methods / kinds each option belongs to (the flat model's "only applies to" rules)
APPLIES = {"coreset_projection_dim": ("exact", "chunked"), "coreset_chunk_points": ("chunked",), "knn_backend": (),
           "hnsw_m": ("hnsw",), "hnsw_ef_construction": ("hnsw",), "hnsw_ef_search": ("hnsw",),
           "ivf_nlist": ("ivf", "pca_ivf"), "ivf_nprobe": ("ivf", "pca_ivf"), "pca_dim": ("pca_ivf",),
           "rerank_candidates": ("pca_ivf",)}
_NEW_PATH = {"knn_index": "knn.kind", "knn_backend": "knn.kind (faiss: flat)", "coreset_method": "coreset.method (greedy: exact)"}


def upgrade_flat_keys(params_model, data: dict) -> tuple[dict, list[str]]:
    """``data`` with the flat keys moved into ``coreset`` / ``knn``, and one note per key moved.

    ``params_model`` (a detector's parameter model, or None) gives the default coreset a flat
    ``coreset_method`` without ``coreset_ratio`` meant. Imports nothing heavy: the torch-free ONNX
    runtime reads earlier model folders through it too.
    """
    old = {k: data[k] for k in MOVED if k in data}
    if not old:
        return data, []
    out = {k: v for k, v in data.items() if k not in MOVED}
    notes = [f"detector.params.{k} is now detector.params.{_NEW_PATH.get(k, '.'.join(MOVED[k]))}; "
             "the flat key is accepted for this release" for k in old]
    for section in ("coreset", "knn"):
        given = {k: v for k, v in old.items() if MOVED[k][0] == section}
        if not given:
            continue
        if isinstance(out.get(section), dict):
            raise ValueError(f"{next(iter(given))} and {section} both set: give {section} only")
        out[section] = _section(params_model, section, given)
    return out, notes


def _section(params_model, section: str, given: dict[str, Any]) -> dict:
    if section == "coreset":
        default = params_model.model_fields["coreset"].get_default(call_default_factory=True) if params_model else None
        method = given.get("coreset_method", default.method if default else "exact")
        kind = "exact" if method == "greedy" else method
        out = {"method": kind}
        if "coreset_ratio" in given or default is not None:
            out["ratio"] = given.get("coreset_ratio", default.ratio if default else None)
    else:
        kind = given.get("knn_index", "exact")
        if kind != "exact" and given.get("knn_backend", "torch") != "torch":
            raise ValueError(f"knn_backend only applies to knn_index: exact (knn_index is {kind}); use knn: {{kind: {kind}}}")
        if kind == "exact" and given.get("knn_backend", "torch") != "torch":
            kind = "flat" if given["knn_backend"] == "faiss" else given["knn_backend"]
        out = {"kind": kind}
    for key, value in given.items():
        name = MOVED[key][1]
        if name in ("method", "ratio", "kind"):
            continue
        if kind in APPLIES[key] or OLD_DEFAULTS[key] != value:
            out[name] = value  # an option of another kind at a non-default value: refused by validation
    return out
