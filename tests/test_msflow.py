"""MSFlow detector: schedule, validation, divergence, feature caching, scoring, persistence."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pyimgano_core.detectors import create_detector
from pyimgano_core.detectors.msflow import MSFlowParams, lr_factor
from pyimgano_core.errors import ModelError, NotFittedError
from pyimgano_core.model import Model
from tests.helpers import PyramidEmbedder
from tests.test_contract import images

TINY = dict(image_size=64, cond_channels=4, parallel_blocks=[1, 1, 1], batch_size=4, lr=1e-3, lr_warmup_epochs=1)


class CountingEmbedder(PyramidEmbedder):
    def __init__(self):
        self.images = 0

    def __call__(self, pixels):
        self.images += len(pixels)
        return super().__call__(pixels)


@pytest.mark.parametrize("warmup, milestones", [(12, [70, 90]), (3, [17, 22]), (0, [5])])
def test_lr_schedule_equals_torch_linear_warmup_chained_with_multistep(warmup, milestones):
    p = MSFlowParams(layers=["a"], parallel_blocks=[1], lr=1e-4, lr_warmup_epochs=warmup, lr_decay_epochs=milestones)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=p.lr)
    scheds = [torch.optim.lr_scheduler.MultiStepLR(opt, milestones, p.lr_decay_gamma)]
    if warmup:  # as the reference train.py: both step once per (sub-)epoch
        scheds.insert(0, torch.optim.lr_scheduler.LinearLR(opt, p.lr_warmup_from, 1.0, total_iters=warmup))
    for epoch in range(100):
        assert p.lr * lr_factor(epoch, p) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), epoch
        opt.step()
        for s in scheds:
            s.step()


@pytest.mark.parametrize("bad", [dict(max_epochs=0), dict(batch_size=0), dict(lr=0.0), dict(lr=-1e-3), dict(lr=2.0),
                                 dict(parallel_blocks=[1, 1]), dict(parallel_blocks=[1, 0, 1]), dict(cond_channels=6)])
def test_bad_params_fail_before_any_work(bad):
    emb = CountingEmbedder()
    det = create_detector("msflow", embedder=emb, **{**TINY, **bad})
    with pytest.raises(ValidationError):
        det.fit(images(2, 0))
    assert emb.images == 0


def test_nonfinite_loss_stops_with_one_line_and_leaves_no_model():
    class NaNEmbedder(PyramidEmbedder):
        def __call__(self, pixels):
            feats = super().__call__(pixels)
            feats[1][:, :, 0, 0] = float("nan")
            return feats

    det = create_detector("msflow", embedder=NaNEmbedder(), max_epochs=3, **{k: v for k, v in TINY.items()})
    with pytest.raises(ModelError) as err:
        det.fit(images(4, 0))
    msg = str(err.value)
    assert "\n" not in msg and "diverged at epoch 1/3" in msg and "lr" in msg
    with pytest.raises(NotFittedError):
        det.predict(images(1, 1))


def test_backbone_runs_once_per_training_image_and_progress_is_reported(tmp_path):
    emb, seen = CountingEmbedder(), []
    det = create_detector("msflow", embedder=emb, on_epoch=lambda info, d: seen.append(dict(info)), max_epochs=4, **TINY)
    stages = []
    det.fit_progress = lambda stage, done, total: stages.append((stage, done, total))
    train = images(6, 0)
    det.fit(train)
    assert stages[0] == ("extracting features", 4, 6) and stages[1] == ("extracting features", 6, 6)
    assert [s[1:] for s in stages[2:]] == [(e, 4) for e in (1, 2, 3, 4)]
    assert stages[-1][0] == f"training (loss {seen[-1]['loss']:.4f} nats/dim)"
    assert emb.images == len(train)  # features cached: 4 epochs, one backbone pass per image
    assert [s["epoch"] for s in seen] == [1, 2, 3, 4] and all(s["epochs"] == 4 for s in seen)
    assert all(np.isfinite(s["loss"]) for s in seen) and seen[-1]["loss"] < seen[0]["loss"]
    assert seen[0]["lr"] == pytest.approx(1e-4) and seen[1]["lr"] == pytest.approx(1e-3)  # warm-up from 0.1
    test = images(3, 1)
    pred = det.predict(test)
    assert pred.maps.shape == (3, 64, 64)
    Model(det).save(tmp_path / "m")
    loaded = Model.load(tmp_path / "m", embedder=PyramidEmbedder()).detector
    assert [h["loss"] for h in loaded.history_] == [s["loss"] for s in seen]
    np.testing.assert_array_equal(loaded.predict(test).maps, pred.maps)


def test_postprocess_follows_the_reference_formulas():
    det = create_detector("msflow", embedder=PyramidEmbedder(), **TINY)
    det.params_ = MSFlowParams(**{k: v for k, v in TINY.items()}, layers=["a", "b", "c"], top_k=0.25)
    flat = [torch.full((2, 4, 4), -1.0), torch.full((2, 2, 2), -3.0)]
    flat[0][1, 0, 0] = -1.0 - np.log(4.0)  # image 1: one position 4x less likely at the fine scale
    score, amap = det._postprocess(flat, (4, 4))
    assert abs(score[0]) < 1e-6 and np.abs(amap[0]).max() < 1e-6  # uniform likelihood: nothing anomalous
    # add map: sum_l exp(logp_l - max_l) upsampled; the dip gives exp(-log 4) = 1/4 at (0, 0)
    assert amap[1, 0, 0] == pytest.approx(0.75, abs=1e-6) and amap[1].argmax() == 0
    assert amap[1].ravel()[1:].max() < 0.75 - 1e-3
    # image score: mean of the top 25% (4 of 16) of the mul map 1 - exp(sum_l logp_l - max)
    mul = 1 - torch.exp(torch.nn.functional.interpolate(flat[0][1:, None], size=(4, 4), mode="bilinear",
                                                        align_corners=True)[0, 0] + 1.0)
    assert score[1] == pytest.approx(float(mul.flatten().topk(4).values.mean()), rel=1e-5)
    det.params_ = det.params_.model_copy(update={"anomaly_map": "mul"})
    _, amap_mul = det._postprocess(flat, (4, 4))
    np.testing.assert_allclose(amap_mul[1], mul.numpy(), rtol=1e-5, atol=1e-6)
