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
from ..errors import ImageError, InputError
from ..images import check_geometry, decode
from ..render import figures
from .handlers import UserError
from .i18n import error_text, t

PARTNER = {"classroom-vit": "classroom-tnt", "classroom-tnt": "classroom-vit"}


def default_example(paths: list[str], loaded: Any = None) -> str:
    """The example shown at start: the one ``loaded`` classifies right most confidently (a
    misclassified first image would open the lesson on a wrong answer); without a model, a star."""
    if loaded is not None:
        from .handlers import example_scores

        scores = example_scores(loaded, paths)
        best = max(paths, key=lambda p: (scores.get(p, -1.0), -paths.index(p)))
        if scores.get(best, -1.0) >= 0:
            return best
    return next((p for p in paths if "star" in p), paths[0])


def _thumb(img: np.ndarray, side: int = 72) -> str:
    h, w = img.shape[:2]
    k = side / max(h, w)
    small = cv2.resize(img, (max(1, round(w * k)), max(1, round(h * k))),
                       interpolation=cv2.INTER_NEAREST if k >= 1 else cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", small[..., ::-1])
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode() if ok else ""


def image_set(source: str, count: int, files: list[str] | None,
              checks: list[tuple[Any, int]] = ()) -> tuple[list[Any], list[str], list[str], list]:
    """The images, their labels, their thumbnails and the files left out (``(name, why)``).

    An uploaded set may hold a few unusable files (a zip's ``../`` entry, a damaged or tiny image,
    a panorama): they are left out and listed rather than failing the whole set. ``checks`` holds
    ``(data config, patch size)`` of every model that will embed the set.

    Uploaded images are returned still encoded (bytes or paths): each is decoded here once to check
    it and draw its thumbnail, then dropped, and decoded again batch by batch while embedding.
    Holding up to 2,000 decoded photos at once would take gigabytes (each may have 50 megapixels).
    """
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
        return imgs, labels, [_thumb(i) for i in imgs], []
    if not files:
        raise InputError("Upload images or a zip first.", code="too_few_images", n=0, min=E.MIN_IMAGES)
    found = imagesets.collect(files, E.MAX_IMAGES)
    skipped: list[tuple[str, Any]] = [_skip_reason(why) for why in found.skipped]
    items, labels, thumbs = [], [], []
    for item, label, name in zip(found.items, found.labels, found.names):
        try:  # size and format first, then whether every model can use its shape
            arr = decode(item).array
            for cfg, patch in checks:
                check_geometry(arr.shape[:2], cfg, patch)
        except ImageError as err:
            skipped.append((name, err))
            continue
        items.append(item)
        labels.append(label or "?")
        thumbs.append(_thumb(arr))
        del arr
    return items, labels, thumbs, skipped


def _skip_reason(why: str) -> tuple[str, Any]:
    """imagesets' English reason ("a/b.png: path leaves the archive") as (name, i18n key)."""
    name, _, reason = why.partition(": ")
    for marker, key in (("leaves the archive", "skip_path"), ("damaged or unreadable", "skip_unreadable"),
                        ("not an image", "skip_not_image")):
        if marker in reason:
            return name, key
    return why, None


def _skipped_note(skipped: list[tuple[str, Any]], lang: str) -> str:
    """The files left out, each with its reason in ``lang`` (kept untranslated in the t-SNE cache,
    so switching the language afterwards translates them too)."""
    if not skipped:
        return ""
    parts = []
    for name, why in skipped[:5]:
        text = error_text(lang, why) if isinstance(why, BaseException) else t(lang, why) if why else ""
        parts.append(f"{name} ({text})" if text else name)
    items = "; ".join(parts) + (" …" if len(skipped) > 5 else "")
    return " " + t(lang, "tsne_skipped", n=len(skipped), items=items)


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
        models = {spec: zoo.load_model(spec) if not ms.get("checkpoint") else zoo.load_model(
            ms.get("arch") or spec, checkpoint=ms["checkpoint"]) for spec in specs}
        checks = [(m.data_config, max(m.facts.patch_size)) for m in models.values()]
        imgs, labels, thumbs, skipped = image_set(source, count, paths, checks)
        try:
            E.check_count(len(imgs))
        except InputError as err:  # say which files were left out, or "got 2" makes no sense
            raise UserError(error_text(lang, err) + _skipped_note(skipped, lang)) from None
        embs = {}
        for spec, loaded in models.items():
            embs[spec] = E.embed_images(loaded, imgs, progress=lambda d, n, nm=spec: progress(
                d / n, desc=t(lang, "tsne_progress", name=nm)))
        zh = {}
        for m in models.values():  # the bundled models' class names in Chinese, for the legend
            names_zh = (m.notes or {}).get("classes_zh") or []
            if len(names_zh) == len(m.label_names or []):
                zh.update(zip(m.label_names, names_zh))
        cache = {"key": key, "labels": labels, "thumbs": thumbs, "embs": embs,
                 "skipped": skipped, "zh": zh,
                 "names": {s: m.label_names if not ms.get("checkpoint") else None for s, m in models.items()}}
    zh = cache.get("zh") or {}

    def shown(name: str) -> str:
        return zh.get(name, name) if lang == "zh-CN" else name

    labels = cache["labels"]
    panels = []
    for spec, emb in cache["embs"].items():
        L = emb.class_tokens.shape[0] - 1
        li = min(max(layer, 0), L)
        x = emb.final if li == L else emb.class_tokens[li]
        xy = E.tsne_2d(x)
        sil = E.silhouette(x, labels) if len(set(labels)) > 1 and "?" not in labels else None
        names = cache["names"].get(spec)
        headless = bool(len(emb.predictions)) and int(emb.predictions.max()) < 0  # no classifier head
        preds = [shown(names[p]) if names and 0 <= p < len(names) else str(p) for p in emb.predictions]
        shown_labels = [shown(lb) for lb in labels]
        groups = shown_labels if colour == "label" or headless else preds
        hover = shown_labels if headless else [f"{lb} → {pr}" for lb, pr in zip(shown_labels, preds)]
        panels.append({"title": t(lang, "tsne_panel", name=spec, layer=li,
                                  sil="—" if sil is None else f"{sil:.2f}"),
                       "xy": xy, "groups": groups, "hover": hover, "thumbs": cache["thumbs"]})
    fig = figures.tsne_plot(panels, title=t(lang, "tsne_title"))
    text = t(lang, "tsne_done", n=len(labels), name=" + ".join(cache["embs"]), sec=time.perf_counter() - t0)
    text += _skipped_note(cache.get("skipped") or [], lang)
    return fig, text, cache
