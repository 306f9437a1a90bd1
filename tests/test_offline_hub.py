"""Offline: hub weights are looked up in the cache only, so a missing file fails at once."""
from __future__ import annotations

import socket

import pytest

from pyimgano_core.errors import ModelError

timm = pytest.importorskip("timm")
hub = pytest.importorskip("huggingface_hub.constants")


def test_unreachable_hub_builds_in_offline_mode_and_fails_fast(monkeypatch):
    from pyimgano_core.features import vit

    def no_network(*a, **k):
        raise OSError("Name or service not known")

    seen = []

    def create_model(name, pretrained, **kw):
        seen.append(hub.HF_HUB_OFFLINE)
        raise RuntimeError("LocalEntryNotFoundError: not in the local cache")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(timm, "create_model", create_model)
    with pytest.raises(ModelError, match="Offline"):
        vit.build_timm_vit("vit_small_patch14_dinov2.lvd142m", "DEFAULT")
    assert seen == [True] and hub.HF_HUB_OFFLINE is False  # offline only during the build
