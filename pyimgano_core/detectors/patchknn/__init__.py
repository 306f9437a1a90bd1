"""The patch-kNN core shared by PatchCore, SoftPatch, AnomalyDINO and OpenCLIP patch kNN, as small parts.

``plan`` (how images become model inputs), ``bank`` (training features -> memory rows),
``coreset`` (``Coreset(params).run(features) -> indices``), ``index`` (a registry of
nearest-neighbour kinds), ``scorer`` (distances -> patch scores), ``image_score`` (patch scores
-> image score), ``maps`` (patch grids -> anomaly maps) and ``detector`` (their composition).
"""
from .coreset import Coreset, CoresetParams
from .detector import PatchEmbedder, PatchKNNDetector
from .greedy import greedy_coreset
from .image_score import Aggregation, aggregate
from .index import KNNParams, make_index
from .maps import to_grid, upsample
from .params import MIN_GRID, PatchKNNParams

__all__ = ["Aggregation", "Coreset", "CoresetParams", "KNNParams", "MIN_GRID", "PatchEmbedder", "PatchKNNDetector",
           "PatchKNNParams", "aggregate", "greedy_coreset", "make_index", "to_grid", "upsample"]
