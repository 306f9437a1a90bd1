"""SoftPatch (Jiang et al., "SoftPatch: Unsupervised Anomaly Detection with Noisy Data", NeurIPS 2022).

Paper: https://arxiv.org/abs/2403.14233 . PatchCore for training sets that may hold defective
images. Before the coreset is built, every training patch gets an outlier score computed
*per spatial position*: the N training patches at grid position (i, j) form one set, and a
noise discriminator (LOF, nearest-neighbour distance, or a Gaussian's Mahalanobis distance)
scores each patch against the others of its set, on features randomly projected to a low
dimension. Patches above the global ``1 - threshold`` quantile of those scores are dropped
from the coreset candidates; the kept patches remember their score as a soft weight, and at
test time a patch's nearest-neighbour distance (squared, as the reference's faiss
``IndexFlatL2``, by default; see ``distance``) is multiplied by the weight of the memory entry
it matched (entries tied with it within float rounding share that weight: ``matched_weight``).
Features, coreset, image scores and maps are PatchCore's (shared patch-kNN core).

Where the reference code (TencentYoutuResearch/AnomalyDetection-SoftPatch) and the paper
disagree we follow the paper; each such place says so in a comment.

Example
-------
>>> det = SoftPatch(backbone="mobilenet_v2", layers=["features.6", "features.13"],
...                 weights="../shared/weights/mobilenet_v2-b0353104.pth").fit(train_paths)
>>> pred = det.predict(test_paths)   # pred.scores [N], pred.maps [N, 224, 224]
>>> det.train_outlier_scores_.shape  # (N_train, h, w): which training patches looked noisy
"""
from __future__ import annotations

import time
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from ..errors import DataError
from .base import register_detector
from .patchcore import CNNPatchParams, make_cnn_embedder
from .patchknn import PatchKNNDetector
from .patchknn.scorer import PlainScorer, WeightedScorer

NoiseDiscriminator = Literal["lof", "nearest", "gaussian"]

# Pairwise-distance block per chunk of grid positions: [chunk, N, N] float32 stays near 64 MB.
_CHUNK_ELEMENTS = 1 << 24
# Ridge added to each position's covariance (PaDiM / the reference's Gaussian: 0.01 * I).
_GAUSSIAN_RIDGE = 0.01
_PROJECT_ROWS = 1 << 14  # training rows read and projected at a time
# Soft weight at (near-)tied nearest neighbours (matched_weight): the window must exceed the float32
# disagreement of two runtimes' squared distances (|q|^2 - 2 q.m + |m|^2 cancellation) so both pick
# one weight, and stay small enough to leave the reference's weight in place almost everywhere.
# Chosen with benchmarks/softpatch_ties.py (reports/softpatch_ties.md).
TIE_RTOL = 1e-2
TIE_NEIGHBOURS = 4  # entries that may share the weight (more inside the window is very rare: same report)


class SoftPatchParams(CNNPatchParams):
    """SoftPatch = PatchCore's parameters + patch-level denoising of the training set."""

    noise_discriminator: NoiseDiscriminator = Field(
        "lof", description="outlier score of a patch among the training patches at the same grid position: "
        "lof (local outlier factor), nearest (distance to the nearest other patch), gaussian (Mahalanobis distance)")
    threshold: float = Field(
        0.15, gt=0, lt=1, description="share of training patches (highest outlier scores) excluded from the coreset candidates")
    # The reference's main.py passes `LOF_k=args.lof_k` to a loader whose argument is `lof_k`: the
    # value vanishes into **kwargs and LOF always runs with the loader default k=5, whatever
    # --lof_k says. Here lof_k is honoured; its default is the reference's documented --lof_k 6.
    lof_k: int = Field(6, ge=1, description="neighbours of the local outlier factor (capped at n_train_images - 1)")
    soft_weight: bool = Field(
        True, description="multiply each test patch's nearest-neighbour distance by the matched memory entry's "
        "outlier weight (the paper's soft re-weighting); False = hard filtering only (the reference's --without_soft_weight)")
    noise_projection_dim: int = Field(
        128, ge=1, description="random projection of the patch features used by the noise discriminator")

    @model_validator(mode="after")
    def _one_bank(self):
        # the noise scores, their cut and the soft weights are statistics of one memory bank
        if self.tiling is not None and self.tiling.bank == "per_tile":
            raise ValueError("tiling.bank: per_tile is not supported by softpatch (its noise filtering is per memory bank); "
                             "use tiling.bank: shared")
        return self


# ---------------------------------------------------------------------------- noise scoring
def project(features, dim: int, seed: int) -> torch.Tensor:
    """Random linear projection of ``features`` [M, D] to [M, dim] (identity when D <= dim).

    Entries are N(0, 1/(3D)): the variance of ``torch.nn.Linear``'s default initialisation that
    the reference uses for this projection, so distances (``nearest`` weight = distance + 1) and
    the Gaussian's fixed ridge see the reference's feature scale. Seeded, hence deterministic.
    ``features`` may be a disk-backed store: rows are read and projected a chunk at a time.
    """
    M, D = features.shape
    proj = None
    if dim < D:
        rng = np.random.default_rng([seed, 0x50F7])  # own stream: independent of the coreset's draws
        proj = torch.from_numpy((rng.standard_normal((D, dim)) / np.sqrt(3.0 * D)).astype(np.float32))
    out = torch.empty(M, min(dim, D))
    for s in range(0, M, _PROJECT_ROWS):
        x = torch.from_numpy(np.ascontiguousarray(features[s : s + _PROJECT_ROWS], dtype=np.float32))
        out[s : s + len(x)] = x if proj is None else x @ proj
    return out


def _chunks(P: int, N: int):
    step = max(1, _CHUNK_ELEMENTS // max(N * N, 1))
    for s in range(0, P, step):
        yield slice(s, min(P, s + step))


def _pairwise(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [C, N, N] within each position's set, self-distances set to +inf."""
    d = torch.cdist(x, x)
    d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    return d


def lof_scores(x: torch.Tensor, k: int) -> torch.Tensor:
    """Local outlier factor (Breunig et al. 2000) of every patch within its position's set.

    ``x``: [P, N, d] (position, image, feature) -> [P, N]. Same definition as scikit-learn's
    ``LocalOutlierFactor(n_neighbors=k).negative_outlier_factor_`` negated (k nearest *other*
    points, reachability distance ``max(d(p, o), k-distance(o))``, lrd = 1 / (mean reach + 1e-10)),
    batched over positions in chunks of [C, N, N] distances. ~1 for inliers, > 1 for outliers.
    """
    P, N, _ = x.shape
    k = min(k, N - 1)
    out = torch.empty(P, N)
    for sl in _chunks(P, N):
        knn_d, knn_i = torch.topk(_pairwise(x[sl]), k, dim=2, largest=False)  # (C, N, k), ascending
        k_dist = knn_d[:, :, -1]  # (C, N): distance to each point's k-th neighbour
        reach = torch.maximum(knn_d, torch.gather(k_dist, 1, knn_i.flatten(1)).view_as(knn_d))
        lrd = 1.0 / (reach.mean(2) + 1e-10)  # (C, N)
        out[sl] = torch.gather(lrd, 1, knn_i.flatten(1)).view_as(knn_d).mean(2) / lrd
    return out


def nearest_scores(x: torch.Tensor) -> torch.Tensor:
    """Distance of every patch to the nearest other patch of its position's set: [P, N, d] -> [P, N].

    The reference sums the two smallest entries of a distance row that includes the point's own
    (ideally zero; in float32 a small rounding residue) distance; excluding self exactly gives the
    same quantity without the residue.
    """
    P, N, _ = x.shape
    out = torch.empty(P, N)
    for sl in _chunks(P, N):
        out[sl] = _pairwise(x[sl]).amin(2)
    return out


def gaussian_scores(x: torch.Tensor, ridge: float = _GAUSSIAN_RIDGE) -> torch.Tensor:
    """Mahalanobis distance of every patch under a Gaussian fitted to its position's set.

    Mean and unbiased covariance per position (+ ``ridge`` * I, as PaDiM and the reference),
    solved through a Cholesky factor. [P, N, d] -> [P, N].
    """
    P, N, d = x.shape
    out = torch.empty(P, N)
    eye = torch.eye(d)
    step = max(1, _CHUNK_ELEMENTS // max(d * d + N * d, 1))
    for s in range(0, P, step):
        xc = x[s : s + step]
        delta = xc - xc.mean(1, keepdim=True)  # (C, N, d)
        cov = delta.transpose(1, 2) @ delta / max(N - 1, 1) + ridge * eye
        z = torch.linalg.solve_triangular(torch.linalg.cholesky(cov), delta.transpose(1, 2), upper=False)
        out[s : s + step] = z.square().sum(1).sqrt()
    return out


def outlier_scores(x: torch.Tensor, method: NoiseDiscriminator, lof_k: int) -> torch.Tensor:
    """Per-position outlier scores [P, N] of patch features ``x`` [P, N, d] (higher = noisier)."""
    if method == "lof":
        return lof_scores(x, lof_k)
    if method == "nearest":
        return nearest_scores(x)
    if method == "gaussian":
        return gaussian_scores(x)
    raise ValueError(f"noise_discriminator must be one of lof, nearest, gaussian; got {method!r}")


def soft_weights(scores: np.ndarray, method: NoiseDiscriminator) -> np.ndarray:
    """Memory weights from outlier scores, as the reference code derives them.

    LOF is already ~1 for inliers and is used as is; the two distances get + 1 so that a
    perfectly typical patch weighs 1. Clamped at 0 (a no-op for these three scores).
    """
    w = scores if method == "lof" else scores + 1.0
    return np.maximum(w, 0.0).astype(np.float32)


def matched_weight(d2: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, rtol: float = TIE_RTOL) -> torch.Tensor:
    """Soft weight of each query's nearest memory entry, continuous at ties: [Q, k] -> [Q].

    ``d2``: squared distances to the k nearest entries (ascending), ``idx``: their bank indices.
    The reference multiplies the distance by the weight of the single entry its faiss search
    returned (TencentYoutuResearch/AnomalyDetection-SoftPatch, ``src/softpatch.py``,
    ``_predict``: ``np.take(coreset_weight, indices)``). That entry is arbitrary when two entries
    are (nearly) equidistant and carry different weights: a float-rounding difference (torch vs
    onnxruntime, faiss vs torch, another BLAS) then swaps the weight, and the patch score jumps
    by the weight difference (on bottle: 1-2 of 65,072 test patches, by 0.4-1.5% of the hottest patch's score). Here
    each entry within ``rtol`` (relative, of the nearest squared distance) contributes with a
    share falling linearly from 1 at a tie to 0 at the edge of that window,
    ``c_j = clip(1 - (d2_j - d2_1) / (rtol * d2_1), 0, 1)``, and the weight is
    ``sum c_j w_j / sum c_j``: the reference's weight whenever the runner-up is more than
    ``rtol`` farther (the nearest has c = 1, the others 0), the mean weight at an exact tie,
    and a continuous function of the distances everywhere, so rounding noise moves it by
    rounding-sized amounts. Plain tensor ops: the ONNX graph (deploy/graph.py) traces this very
    function, so both runtimes apply one rule.
    """
    gap = (d2 - d2[:, :1]) / (d2[:, :1] * rtol + 1e-30)
    share = torch.clamp(1.0 - gap, min=0.0, max=1.0)
    w = torch.index_select(weights, 0, idx.reshape(-1)).reshape(idx.shape)
    return (share * w).sum(1) / share.sum(1)


# ---------------------------------------------------------------------------- detector
@register_detector
class SoftPatch(PatchKNNDetector):
    """PatchCore with patch-level noise filtering and soft re-weighting of the memory bank.

    Learned state: ``memory_`` [M, D] (the coreset), ``memory_weights_`` [M] (soft weight of each
    entry), ``train_outlier_scores_`` [N_train, h, w] (every training patch's outlier score, for
    inspecting which training images look defective), ``outlier_cutoff_`` (score above which a
    patch was excluded) and ``n_excluded_patches_``.
    """

    name = "softpatch"
    Params = SoftPatchParams

    def _make_embedder(self):
        return make_cnn_embedder(self.params_)

    def _select_memory(self, features, grid_hw) -> np.ndarray:
        p = self.params_
        h, w = grid_hw
        P = h * w
        n_images = len(features) // P
        if n_images < 2:
            raise DataError(f"SoftPatch scores each training patch against the other training images: it needs "
                            f"at least 2 training images, got {n_images}")
        t0 = time.perf_counter()
        reduced = project(features, p.noise_projection_dim, p.seed).view(n_images, P, -1)
        t1 = time.perf_counter()
        # (N, h*w, d) -> (h*w, N, d): the set of each grid position across the training images,
        # a chunk of positions at a time (positions are scored independently)
        by_position = torch.empty(P, n_images)
        step = max(1, _CHUNK_ELEMENTS // max(n_images * reduced.shape[-1], 1))
        for s in range(0, P, step):
            chunk = reduced[:, s : s + step].transpose(0, 1).contiguous()
            by_position[s : s + step] = outlier_scores(chunk, p.noise_discriminator, p.lof_k)
        del reduced
        scores = by_position.T.reshape(-1).numpy()  # (N*h*w,)
        t2 = time.perf_counter()

        # Global cut (paper: the top `threshold` share of all patch scores is noise). Strictly above
        # the quantile, as the reference: with tied scores nothing is dropped needlessly.
        cutoff = float(np.quantile(scores, 1.0 - p.threshold))
        kept = np.flatnonzero(scores <= cutoff)
        weights = soft_weights(scores, p.noise_discriminator)
        # The coreset is drawn from the kept patches only (paper: the coreset is built on the denoised
        # set). The reference instead zeroes excluded patches' distances inside its greedy sampler,
        # whose first pick is unweighted and so can still be an excluded patch. Its size is
        # coreset.ratio of *all* training patches, as in the reference (= PatchCore's memory size).
        # The search is the shared exact greedy k-center of our PatchCore, where the reference uses
        # its approximate variant (10 random starting points).
        if p.coreset.ratio < 1:
            kept = kept[self._coreset_picks(features, rows=kept, n_total=len(features))]
        t3 = time.perf_counter()

        self.memory_weights_ = weights[kept]
        self.train_outlier_scores_ = scores.reshape(n_images, h, w).astype(np.float32)
        self.outlier_cutoff_ = cutoff
        self.n_excluded_patches_ = int(len(scores) - np.count_nonzero(scores <= cutoff))
        self.timing_.update(noise_projection_s=t1 - t0, noise_scoring_s=t2 - t1, coreset_s=t3 - t2)
        return np.ascontiguousarray(features[kept], dtype=np.float32)

    def _memory_needs(self, n_patches: int, dim: int) -> dict[str, int]:
        # + the noise projection of every training patch, its scores, and a chunk of per-position sets
        needs = super()._memory_needs(n_patches, dim)
        needs["noise_scoring"] = n_patches * (min(self.params_.noise_projection_dim, dim) * 4 + 24) + 8 * _CHUNK_ELEMENTS
        return needs

    def _make_scorer(self) -> PlainScorer:
        squared = self.params_.distance == "squared"
        if not self.params_.soft_weight:
            return PlainScorer(squared)
        # the neighbours that may share the soft weight at a near-tie (matched_weight)
        return WeightedScorer(self.memory_weights_, matched_weight, min(TIE_NEIGHBOURS, len(self.memory_)), squared)

    # -- persistence ---------------------------------------------------------------------
    def state(self):
        arrays, extras = super().state()
        arrays.update(memory_weights_=self.memory_weights_, train_outlier_scores_=self.train_outlier_scores_)
        extras.update(outlier_cutoff_=self.outlier_cutoff_, n_excluded_patches_=self.n_excluded_patches_)
        return arrays, extras

    def load_state(self, arrays, extras) -> None:
        super().load_state(arrays, extras)
        self.memory_weights_ = np.asarray(arrays["memory_weights_"], dtype=np.float32)
        self.train_outlier_scores_ = np.asarray(arrays["train_outlier_scores_"], dtype=np.float32)
        self.outlier_cutoff_ = float(extras["outlier_cutoff_"])
        self.n_excluded_patches_ = int(extras["n_excluded_patches_"])
        if len(self.memory_weights_) != len(self.memory_):
            raise ValueError(f"memory_weights_ has {len(self.memory_weights_)} entries for a memory of {len(self.memory_)}")
