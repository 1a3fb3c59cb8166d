"""Shared fixtures: a tiny, randomly initialised model of the same timm family as the real backbone."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Same family as vit_base_patch14_reg4_dinov2 (patch 14, 4 registers, no_embed_class, layer scale),
# shrunk: 2 blocks, width 64, 56 px -> a 4x4 patch grid. Builds in milliseconds.
TINY_MODEL = "vit_base_patch14_reg4_dinov2.lvd142m"
TINY_KWARGS = dict(depth=2, embed_dim=64, num_heads=2, img_size=56)


@pytest.fixture(autouse=True)
def _seed_and_no_network(monkeypatch):
    """Every test starts seeded; the hub is marked offline so nothing can try to download."""
    torch.manual_seed(0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


@pytest.fixture
def tiny_model():
    from model_utils import load_backbone
    torch.manual_seed(0)
    return load_backbone(TINY_MODEL, pretrained=False, **TINY_KWARGS)
