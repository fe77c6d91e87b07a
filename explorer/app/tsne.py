"""The class-token t-SNE view: embed an image set once, map any layer from the cached embedding."""
from __future__ import annotations

import base64
import time
from typing import Any

import cv2
import numpy as np

from .. import imagesets, zoo
from ..analysis import embeddings as E
from ..classroom import shapes
from ..classroom.train import EVAL_SEED
from ..errors import InputError
from ..images import decode
from ..render import figures
from .i18n import t

PARTNER = {"classroom-vit": "classroom-tnt", "classroom-tnt": "classroom-vit"}


def default_example(paths: list[str]) -> str:
    """The example shown at start: a star if there is one (it reads well in every view)."""
    return next((p for p in paths if "star" in p), paths[0])


def _thumb(img: np.ndarray, side: int = 72) -> str:
    h, w = img.shape[:2]
    k = side / max(h, w)
    small = cv2.resize(img, (max(1, round(w * k)), max(1, round(h * k))),
                       interpolation=cv2.INTER_NEAREST if k >= 1 else cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", small[..., ::-1])
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode() if ok else ""


def image_set(source: str, count: int, files: list[str] | None) -> tuple[list[np.ndarray], list[str]]:
    if source == "bundled":
        per = max(1, min(count, E.MAX_IMAGES // len(shapes.CLASSES)))
        imgs, labels = [], []
        i = 0
        while len(imgs) < per * len(shapes.CLASSES):  # a fresh, balanced sample (seeds disjoint from training)
            img, _, label = shapes.sample(EVAL_SEED + 17, i)
            i += 1
            if labels.count(shapes.CLASSES[label]) < per:
                imgs.append(img)
                labels.append(shapes.CLASSES[label])
        return imgs, labels
    if not files:
        raise InputError("Upload images or a zip first.", code="too_few_images", n=0, min=E.MIN_IMAGES)
    found = imagesets.collect(files, E.MAX_IMAGES)
    E.check_count(len(found.items))
    arrays = []
    for item in found.items:
        arrays.append(decode(item).array)  # each checked for size and format; errors name the problem
    return arrays, [lb or "?" for lb in found.labels]


def run(ms: dict, source: str, count: int, layer: int, files: Any, colour: str, compare: bool, lang: str,
        cache: dict | None, progress: Any) -> tuple[Any, str, dict]:
    """Embed (or reuse the cached embedding) and draw the t-SNE map(s)."""
    specs = [ms["spec"]]
    if compare and ms["spec"] in PARTNER and not ms.get("checkpoint"):
        specs.append(PARTNER[ms["spec"]])
    paths = sorted(files) if isinstance(files, list) else ([files] if files else [])
    key = (tuple(specs), source, count if source == "bundled" else tuple(paths))
    t0 = time.perf_counter()
    if not cache or cache.get("key") != key:
        imgs, labels = image_set(source, count, paths)
        E.check_count(len(imgs))
        embs = {}
        for spec in specs:
            loaded = zoo.load_model(spec) if not ms.get("checkpoint") else zoo.load_model(
                ms.get("arch") or spec, checkpoint=ms["checkpoint"])
            name = spec
            embs[spec] = E.embed_images(loaded, imgs, progress=lambda d, n, nm=name: progress(
                d / n, desc=t(lang, "tsne_progress", name=nm)))
        cache = {"key": key, "labels": labels, "thumbs": [_thumb(i) for i in imgs], "embs": embs,
                 "names": {s: zoo.load_model(s).label_names if not ms.get("checkpoint") else None for s in specs}}
    labels = cache["labels"]
    panels = []
    for spec, emb in cache["embs"].items():
        L = emb.class_tokens.shape[0] - 1
        li = min(max(layer, 0), L)
        x = emb.final if li == L else emb.class_tokens[li]
        xy = E.tsne_2d(x)
        sil = E.silhouette(x, labels) if len(set(labels)) > 1 and "?" not in labels else None
        names = cache["names"].get(spec)
        preds = [names[p] if names and p < len(names) else str(p) for p in emb.predictions]
        groups = labels if colour == "label" else preds
        hover = [f"{lb} → {pr}" for lb, pr in zip(labels, preds)]
        panels.append({"title": t(lang, "tsne_panel", name=spec, layer=li,
                                  sil="—" if sil is None else f"{sil:.2f}"),
                       "xy": xy, "groups": groups, "hover": hover, "thumbs": cache["thumbs"]})
    fig = figures.tsne_plot(panels, title=t(lang, "tsne_title"))
    text = t(lang, "tsne_done", n=len(labels), name=" + ".join(cache["embs"]), sec=time.perf_counter() - t0)
    return fig, text, cache
