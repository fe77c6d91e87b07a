"""Evaluate the classroom models on fresh shapes (seeds disjoint from training): accuracy, whether
attention rollout finds the object, a randomisation sanity check, position-embedding structure and
class-token cluster quality."""
from __future__ import annotations

import copy
import logging

import numpy as np
import torch

from .. import analysis, zoo
from ..analysis import embeddings as E
from ..analysis.posembed import neighbour_structure
from ..capture import explain_batch
from ..families import default_grid
from . import shapes
from .train import EVAL_SEED

log = logging.getLogger(__name__)

THRESHOLDS = {"accuracy": 0.95, "max_on_object": 0.90, "mass_ratio": 2.5}


object_patches = analysis.object_patches


def rollout_figures(loaded, images, masks, batch: int = 64) -> dict:
    """Accuracy-free attention figures over a sample: max-on-object rate, mass ratio, chance levels."""
    hits, masses, areas = [], [], []
    for i in range(0, len(images), batch):
        exps = explain_batch(loaded, list(images[i:i + batch]))
        for exp, mask in zip(exps, masks[i:i + batch]):
            lay = exp.layout
            row = exp.rollout_row(lay.default_query(), analysis.RolloutOptions())
            stats = analysis.mass_on(object_patches(mask, lay.grid), analysis.patch_map(row, lay.num_prefix, lay.grid))
            hits.append(stats["max_on_object"])
            masses.append(stats["mass"])
            areas.append(stats["area"])
    mass, area = float(np.mean(masses)), float(np.mean(areas))
    return {"max_on_object": float(np.mean(hits)), "max_on_object_chance": area,
            "mass_on_object": mass, "area_share": area, "mass_ratio": mass / area, "mass_ratio_chance": 1.0}


def randomised(loaded) -> zoo.LoadedModel:
    """A copy with every weight re-initialised (Adebayo et al. 2018's model-randomisation test)."""
    net = copy.deepcopy(loaded.model)
    torch.manual_seed(12345)
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    for name, p in net.named_parameters():
        if "pos" in name or "token" in name:
            torch.nn.init.trunc_normal_(p, std=0.02)
    net.eval()
    return zoo.LoadedModel(net, loaded.name + " (re-initialised)", "random", loaded.family, loaded.label_names,
                           loaded.data_config, loaded.facts, {})


def evaluate(images: int = 400, seed: int | None = None, models=("classroom-vit", "classroom-tnt")) -> dict:
    seed = EVAL_SEED if seed is None else seed
    x, masks, y = shapes.batch(seed, 0, images)
    report: dict = {"images": images, "seed": seed, "thresholds": THRESHOLDS, "models": {}}
    for spec in models:
        loaded = zoo.load_model(spec)
        emb = E.embed_images(loaded, list(x), batch_size=128)
        acc = float((emb.predictions == y).mean())
        r = {"accuracy": acc, "accuracy_chance": 1 / len(shapes.CLASSES)}
        r.update(rollout_figures(loaded, x, masks))
        r["sanity_random_weights"] = rollout_figures(randomised(loaded), x, masks)
        r["silhouette_last_layer"] = E.silhouette(emb.final, y)
        pos = loaded.model.pos_embed if hasattr(loaded.model, "pos_embed") else loaded.model.patch_pos
        if pos is not None:
            grid = default_grid(loaded.model)
            r["pos_embed_neighbours"] = neighbour_structure(pos.detach()[0, -grid[0] * grid[1]:].numpy(), grid)
        r["passed"] = (acc >= THRESHOLDS["accuracy"] and r["max_on_object"] >= THRESHOLDS["max_on_object"]
                       and r["mass_ratio"] >= THRESHOLDS["mass_ratio"])
        report["models"][spec] = r
    report["passed"] = all(m["passed"] for m in report["models"].values())
    return report


def format_report(rep: dict) -> str:
    lines = [f"Fresh shapes: {rep['images']} images, seed {rep['seed']} (disjoint from training)", ""]
    hdr = f"{'':34}" + "".join(f"{m:>22}" for m in rep["models"])
    lines.append(hdr)

    def row(label, fn):
        lines.append(f"{label:34}" + "".join(f"{fn(m):>22}" for m in rep["models"].values()))

    row("accuracy (>= 95 %; chance 12.5 %)", lambda m: f"{m['accuracy']:.1%}")
    row("rollout max on object (>= 90 %)", lambda m: f"{m['max_on_object']:.1%}")
    row("  chance (object patch share)", lambda m: f"{m['max_on_object_chance']:.1%}")
    row("rollout mass on object", lambda m: f"{m['mass_on_object']:.1%}")
    row("mass / area ratio (>= 2.5x)", lambda m: f"{m['mass_ratio']:.2f}x")
    row("sanity, re-init: max on object", lambda m: f"{m['sanity_random_weights']['max_on_object']:.1%}")
    row("sanity, re-init: mass ratio", lambda m: f"{m['sanity_random_weights']['mass_ratio']:.2f}x")
    row("silhouette, last-layer class tok", lambda m: "—" if m["silhouette_last_layer"] is None
        else f"{m['silhouette_last_layer']:.3f}")
    row("pos-emb: nearest is a neighbour", lambda m: "—" if "pos_embed_neighbours" not in m else
        f"{m['pos_embed_neighbours']['count']}/{m['pos_embed_neighbours']['total']}"
        f" (chance {m['pos_embed_neighbours']['chance']:.0%})")
    row("passed", lambda m: "yes" if m["passed"] else "NO")
    return "\n".join(lines)
