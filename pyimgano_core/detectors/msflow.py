"""MSFlow (Zhou et al., "MSFlow: Multi-Scale Flow-based Framework for Unsupervised Anomaly
Detection", TNNLS 2024, https://arxiv.org/abs/2308.15300 ; reference code cool-xuan/msflow).

A frozen backbone gives feature maps at three scales (WideResNet50 ``layer1..3``, strides 4/8/16);
each is average-pooled (3x3, stride 2) and mapped to a standard normal by a per-scale *parallel
flow* conditioned on a positional encoding, then all scales pass one *fusion flow*
(:mod:`.flows`). Training maximises the exact likelihood of normal features (``fit`` trains the
flows with Adam; the backbone runs once per training image, its pooled features are cached).
At test time each position's log-likelihood ``-0.5 * mean_c z^2`` per scale is upsampled to the
input size; the image score is the mean of the top 3% of ``1 - exp(sum_l logp_l - max)``
(the reference's "mul" map), and the anomaly map is the reference's "add" map
``max(sum_l p_l) - sum_l p_l`` with ``p_l = exp(logp_l - max logp_l)`` (``post_process.py``;
the paper reports pixel AUROC on "add" and AUPRO on "mul"; ``anomaly_map`` picks one).

Example
-------
>>> det = MSFlow(backbone="mobilenet_v2", layers=["features.3", "features.6", "features.13"],
...              weights="../shared/weights/mobilenet_v2-b0353104.pth", image_size=256,
...              max_epochs=20).fit(train_paths)
>>> pred = det.predict(test_paths)   # pred.scores [N], pred.maps [N, 256, 256]
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..errors import ModelError, NotFittedError
from ..features.backbones import FeatureExtractor
from ..features.geometry import Geometry
from ..features.loading import iter_batches
from .base import Detector, DetectorParams, Prediction, register_detector
from .flows import MultiScaleFlow, nll
from .patchknn import upsample

log = logging.getLogger(__name__)


class MultiScaleEmbedder(Protocol):
    """Maps images (float [B, 3, H, W] in [0, 1], RGB) to feature maps [B, C_l, h_l, w_l], finest first."""

    def __call__(self, pixels: torch.Tensor) -> list[torch.Tensor]: ...


class MSFlowParams(DetectorParams):
    """Defaults are the reference's (``default.py``, ``main.py``): WideResNet50 at 512x512."""

    image_size: int | tuple[int, int] = Field(512, description="squash resize target (h, w); flows train on one grid")
    backbone: str = Field("wide_resnet50_2", description="torchvision model name")
    layers: list[str] = Field(["layer1", "layer2", "layer3"], min_length=1, description="tapped layers, finest first")
    weights: str | None = Field("DEFAULT", description="torchvision weights name, local checkpoint path, or null (random)")
    pool: Literal["avg", "max", "none"] = Field("avg", description="3x3 stride-2 pooling of every tap (reference pool_type)")
    cond_channels: int = Field(64, ge=4, multiple_of=4, description="positional-encoding channels (condition)")
    parallel_blocks: list[int] = Field([2, 5, 8], min_length=1, description="coupling blocks per scale")
    clamp_alpha: float = Field(1.9, gt=0, description="soft clamp of the log-scales")
    max_epochs: int = Field(100, ge=1, description="passes over the training set (reference: 25 x 4 sub-epochs)")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0, le=1, description="Adam learning rate")
    lr_warmup_epochs: int = Field(12, ge=0, description="linear warm-up length (reference: 3 x 4 sub-epochs)")
    lr_warmup_from: float = Field(0.1, gt=0, le=1, description="warm-up start as a fraction of lr")
    lr_decay_epochs: list[int] = Field([70, 90], description="epochs where lr is multiplied by lr_decay_gamma")
    lr_decay_gamma: float = Field(0.33, gt=0, le=1)
    grad_clip: float = Field(2.0, gt=0, description="gradient-norm clip (reference)")
    top_k: float = Field(0.03, gt=0, le=1, description="share of map pixels averaged into the image score")
    anomaly_map: Literal["add", "mul"] = Field("add", description="returned map: reference 'add' (pixel AUROC) or 'mul' (AUPRO)")
    blur_sigma: float = Field(0.0, ge=0, description="Gaussian sigma (input pixels) on the map; the reference does not blur")
    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = 0

    @model_validator(mode="after")
    def _one_count_per_layer(self):
        if len(self.parallel_blocks) != len(self.layers):
            raise ValueError(f"parallel_blocks needs one count per layer: {len(self.layers)} layers, got {self.parallel_blocks}")
        if any(b < 1 for b in self.parallel_blocks):
            raise ValueError(f"parallel_blocks must be >= 1, got {self.parallel_blocks}")
        return self


def lr_factor(epoch: int, p: MSFlowParams) -> float:
    """The reference schedule in closed form: LinearLR warm-up chained with MultiStepLR decay,
    both stepped once per (sub-)epoch (reference ``train.py``)."""
    warm = 1.0
    if epoch < p.lr_warmup_epochs:
        warm = p.lr_warmup_from + (1.0 - p.lr_warmup_from) * epoch / p.lr_warmup_epochs
    return warm * p.lr_decay_gamma ** sum(epoch >= m for m in p.lr_decay_epochs)


@register_detector
class MSFlow(Detector):
    """MSFlow: multi-scale normalizing flows on frozen backbone features (Zhou et al. 2024).

    ``embedder``: optional injected multi-scale feature extractor (tests, custom models).
    ``on_epoch``: optional callback ``on_epoch(info, detector)`` after every training epoch;
    ``info`` = {epoch, epochs, loss (nats per dimension), lr, seconds}. Progress is also logged,
    and reported to ``fit_progress(stage, done, total)`` when a caller (the engine's progress
    bar) sets it: feature extraction per image, then training per epoch with the loss.
    """

    name = "msflow"
    Params = MSFlowParams
    fit_progress: Callable[[str, int, int | None], None] | None = None

    def __init__(self, embedder: MultiScaleEmbedder | None = None, on_epoch: Callable | None = None, **params):
        super().__init__(**params)
        self.embedder = embedder
        self.on_epoch = on_epoch

    @property
    def geometry(self) -> Geometry:
        return Geometry(size=self.params_.image_size)

    def check_fitted(self) -> None:
        super().check_fitted()
        if not hasattr(self, "flow_"):
            raise NotFittedError("MSFlow has no trained flow (fit failed or was not run): call fit() again.")

    # -- features ------------------------------------------------------------------------
    def _embedder(self) -> MultiScaleEmbedder:
        if self.embedder is None:
            p = self.params_
            self.embedder = FeatureExtractor(p.backbone, p.layers, p.weights).to(p.device)
        return self.embedder

    def _pool(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        pool = self.params_.pool  # reference: nn.AvgPool2d(3, 2, 1) (count_include_pad) / MaxPool2d(3, 2, 1)
        if pool == "avg":
            return [F.avg_pool2d(f, 3, 2, 1) for f in feats]
        if pool == "max":
            return [F.max_pool2d(f, 3, 2, 1) for f in feats]
        return list(feats)

    def _features(self, images: list, timing: dict):
        """Yield (pooled per-scale features, batch) for ``images`` in model geometry."""
        p, emb = self.params_, self._embedder()
        for batch in iter_batches(images, self.geometry, p.batch_size):
            t0 = time.perf_counter()
            with torch.inference_mode():
                feats = self._pool([f.float() for f in emb(batch.pixels.to(p.device))])
            if len(feats) != len(p.parallel_blocks):
                raise ValueError(f"embedder returned {len(feats)} scales, parallel_blocks has {len(p.parallel_blocks)}")
            timing["embed_s"] = timing.get("embed_s", 0.0) + time.perf_counter() - t0
            yield [f.clone() for f in feats], batch

    # -- training ------------------------------------------------------------------------
    def _fit(self, images: list) -> None:
        p = self.params_
        t0 = time.perf_counter()
        # The backbone runs once per training image: its pooled features are kept for all epochs.
        chunks = []
        for f, _ in self._features(images, self.timing_):
            chunks.append(f)
            self._progress("extracting features", sum(len(c[0]) for c in chunks), len(images))
        feats = [torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0]))]  # per scale (N, C, h, w)
        del chunks
        self.timing_["features_s"] = time.perf_counter() - t0
        self.channels_ = [int(f.shape[1]) for f in feats]
        self.grids_ = [list(f.shape[-2:]) for f in feats]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.seed)
            self.flow_ = self._build_flow().to(p.device)
        self.history_: list[dict] = []
        self._train(feats)

    def _progress(self, stage: str, done: int, total: int) -> None:
        if self.fit_progress is not None:
            self.fit_progress(stage, done, total)

    def _build_flow(self) -> MultiScaleFlow:
        p = self.params_
        return MultiScaleFlow(self.channels_, p.cond_channels, p.parallel_blocks, p.clamp_alpha, seed=p.seed)

    def _train(self, feats: list[torch.Tensor]) -> None:
        p = self.params_
        n, dims = len(feats[0]), sum(f[0].numel() for f in feats)
        params = list(self.flow_.parameters())
        opt = torch.optim.Adam(params, lr=p.lr)
        order = torch.Generator().manual_seed(p.seed)  # shuffling, as the reference's DataLoader(shuffle=True)
        t_train = time.perf_counter()
        for epoch in range(p.max_epochs):
            t0 = time.perf_counter()
            lr = p.lr * lr_factor(epoch, p)
            for group in opt.param_groups:
                group["lr"] = lr
            self.flow_.train()
            total = 0.0
            for idx in torch.randperm(n, generator=order).split(p.batch_size):
                batch = [f[idx].to(p.device) for f in feats]
                opt.zero_grad(set_to_none=True)
                loss = nll(*self.flow_(batch)).mean()
                if not torch.isfinite(loss):
                    del self.flow_  # never leave a diverged model behind
                    raise ModelError(
                        f"MSFlow training diverged at epoch {epoch + 1}/{p.max_epochs} (loss={loss.item()}); "
                        f"lower detector.params.lr (now {p.lr:g}) or check the features for NaN/Inf."
                    )
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, p.grad_clip)
                opt.step()
                total += loss.item() * len(idx)
            self.flow_.eval()
            info = {"epoch": epoch + 1, "epochs": p.max_epochs, "loss": total / n / dims, "lr": lr,
                    "seconds": time.perf_counter() - t0}
            self.history_.append(info)
            log.info("msflow epoch %d/%d  loss %.4f nats/dim  lr %.2e  %.1fs", info["epoch"], p.max_epochs,
                     info["loss"], lr, info["seconds"])
            self._progress(f"training (loss {info['loss']:.4f} nats/dim)", epoch + 1, p.max_epochs)
            if self.on_epoch is not None:
                self.on_epoch(info, self)
        self.timing_["train_s"] = time.perf_counter() - t_train

    # -- scoring -------------------------------------------------------------------------
    def _predict(self, images: list) -> Prediction:
        p = self.params_
        scores, maps, boxes, hws = [], [], [], []
        timing = {"embed_s": 0.0, "flow_s": 0.0, "maps_s": 0.0}
        for feats, batch in self._features(images, timing):
            t0 = time.perf_counter()
            with torch.no_grad():
                zs, _ = self.flow_(feats)
                logps = [-0.5 * (z * z).mean(1) for z in zs]  # per scale (B, h, w), reference inference
            t1 = time.perf_counter()
            score, amap = self._postprocess(logps, tuple(batch.pixels.shape[-2:]))
            scores.append(score)
            maps.extend(upsample(amap, amap.shape[1:], p.blur_sigma) if p.blur_sigma > 0 else amap)
            boxes.append(batch.boxes)
            hws.append(batch.orig_hw)
            timing["flow_s"] += t1 - t0
            timing["maps_s"] += time.perf_counter() - t1
        return Prediction(np.concatenate(scores).astype(np.float32), np.stack(maps).astype(np.float32),
                          np.concatenate(boxes), np.concatenate(hws), timing)

    def _postprocess(self, logps: list[torch.Tensor], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The reference's ``post_process``: image scores [B] and the chosen map [B, H, W]."""
        up = lambda m: F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]  # noqa: E731
        peak = lambda m: m.amax(dim=(1, 2), keepdim=True)  # noqa: E731  (per image)
        total = sum(up(lp) for lp in logps)
        mul = 1.0 - torch.exp(total - peak(total))  # max of exp(total - max) is exactly 1
        k = max(1, int(size[0] * size[1] * self.params_.top_k))
        score = mul.flatten(1).topk(k, dim=1).values.mean(1)
        if self.params_.anomaly_map == "mul":
            amap = mul
        else:
            probs = sum(up(torch.exp(lp - peak(lp))) for lp in logps)
            amap = peak(probs) - probs
        return score.cpu().numpy(), amap.cpu().numpy()

    # -- persistence: flow weights as arrays, shapes as JSON -----------------------------
    def state(self):
        self.check_fitted()
        arrays = {f"flow.{k}": v.detach().cpu().numpy() for k, v in self.flow_.state_dict().items()}
        return arrays, {"channels_": self.channels_, "grids_": self.grids_, "history_": self.history_}

    def load_state(self, arrays, extras) -> None:
        super().load_state(arrays, extras)
        self.channels_ = [int(c) for c in extras["channels_"]]
        self.grids_ = [list(map(int, g)) for g in extras["grids_"]]
        self.history_ = list(extras.get("history_", []))
        flow = self._build_flow()
        weights = {k[len("flow."):]: torch.from_numpy(np.asarray(v)) for k, v in arrays.items() if k.startswith("flow.")}
        flow.load_state_dict(weights, strict=True)
        self.flow_ = flow.to(self.params_.device).eval()
