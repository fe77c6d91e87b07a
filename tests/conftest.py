"""Shared fixtures: tiny random-weight models of every supported family, no network.

Every model here is built with ``pretrained=False`` and tiny settings (depth 1-2, 56/64-pixel
inputs), so one forward pass takes milliseconds on a CPU. Nothing depends on the bundled models
in ``assets/``: tests that need a bundled or local-dir model save their own tiny one.
"""
from __future__ import annotations

import os

# Before anything imports huggingface_hub: never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import explorer  # noqa: E402
from explorer import zoo  # noqa: E402

#: family key -> (timm name, create_model kwargs, expected prefix roles, expected patch size)
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=64, depth=2), ("cls",), 16),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=64, depth=2), ("cls", "dist"), 16),
    "reg4": ("vit_small_patch14_reg4_dinov2", dict(img_size=56, depth=2, embed_dim=96, num_heads=4),
             ("cls", "reg", "reg", "reg", "reg"), 14),
    "dinov2": ("vit_small_patch14_dinov2", dict(img_size=56, depth=2, embed_dim=96, num_heads=4), ("cls",), 14),
    "gap": ("vit_tiny_patch16_224", dict(img_size=64, depth=2, class_token=False, global_pool="avg"), (), 16),
    "tnt": ("tnt_s_patch16_224", dict(img_size=64, depth=2), ("cls",), 16),
}
FAMILY_KEYS = list(FAMILIES)

_built: dict[str, explorer.LoadedModel] = {}


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from threads: keep the (shared, busy) machine quiet.

    Engine test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``;
    the setting is restored afterwards so benchmarks in the same session are not affected.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(key: str) -> explorer.LoadedModel:
    """A tiny random-weight model of one family, built once per session (not via zoo.CACHE)."""
    if key not in _built:
        name, kwargs, _, _ = FAMILIES[key]
        torch.manual_seed(0)
        _built[key] = explorer.load_model(name, pretrained=False, use_cache=False, **kwargs)
    return _built[key]


@pytest.fixture(params=FAMILY_KEYS)
def family_model(request) -> tuple[str, explorer.LoadedModel]:
    """(family key, LoadedModel), parametrised over every supported family."""
    return request.param, build(request.param)


@pytest.fixture
def vit_model() -> explorer.LoadedModel:
    return build("vit")


@pytest.fixture
def tnt_model() -> explorer.LoadedModel:
    return build("tnt")


def random_image(h: int = 80, w: int = 100, seed: int = 0) -> np.ndarray:
    """An RGB uint8 image with some structure (a gradient plus noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(1, w - 1), yy * 255 / max(1, h - 1), (xx + yy) % 256], -1)
    return np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def image() -> np.ndarray:
    return random_image()


@pytest.fixture
def clean_cache():
    """An empty model cache before and after the test."""
    zoo.CACHE.clear()
    yield zoo.CACHE
    zoo.CACHE.clear()
