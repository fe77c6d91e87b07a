"""A synthetic "shapes" dataset whose right answer is known pixel by pixel.

Every image holds one geometric shape of random colour, size, rotation and position on a varied
background (flat, gradient or mottled noise) with clutter (thin lines and dots), and comes with
the shape's pixel mask. Image ``i`` of a split is a pure function of ``(seed, i)``, so any sample
can be regenerated exactly; training and evaluation use disjoint seeds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "diamond")
CLASSES_ZH = ("圆形", "正方形", "三角形", "五角星", "十字", "圆环", "月牙", "菱形")
SIZE = 64  # pixels; the classroom models use 8×8 patches -> an 8×8 token grid
_SS = 4  # supersampling for anti-aliased edges (cv2 fixed-point shift)


@dataclass(frozen=True)
class SceneConfig:
    """How hard a scene is. ``clutter`` 0 is a plain background, 1 the full difficulty."""

    size: int = SIZE
    clutter: float = 1.0
    radius: tuple[float, float] = (8.0, 14.0)  # shape radius in pixels (circumscribed circle)
    easy: float = 0.0  # share of "easy" scenes: plain background, strong contrast, near the centre


def _polygon(kind: str, r: float, theta: float) -> list[np.ndarray]:
    """Outline(s) of a shape centred at 0, as float (k, 2) arrays."""
    def regular(n: int, rad: float, phase: float = 0.0) -> np.ndarray:
        a = theta + phase + np.arange(n) * 2 * np.pi / n
        return np.stack([rad * np.cos(a), rad * np.sin(a)], 1)

    if kind == "square":
        return [regular(4, r, np.pi / 4)]
    if kind == "triangle":
        return [regular(3, r, -np.pi / 2)]
    if kind == "hexagon":
        return [regular(6, r)]
    if kind == "star":
        outer, inner = regular(5, r, -np.pi / 2), regular(5, r * 0.42, -np.pi / 2 + np.pi / 5)
        return [np.stack([outer, inner], 1).reshape(-1, 2)]
    if kind == "diamond":  # a rhombus whose diagonals differ: never a rotated square
        pts = np.array([[0, -r], [0.55 * r, 0], [0, r], [-0.55 * r, 0]])
        c, s = np.cos(theta), np.sin(theta)
        return [pts @ np.array([[c, s], [-s, c]])]
    if kind == "cross":
        a, b = r, r * 0.36
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a],
                        [-b, b], [-a, b], [-a, -b], [-b, -b]])
        c, s = np.cos(theta), np.sin(theta)
        return [pts @ np.array([[c, s], [-s, c]])]
    raise ValueError(kind)


def _background(rng: np.random.Generator, n: int, clutter: float) -> np.ndarray:
    kind = rng.choice(3, p=[0.3, 0.35, 0.35])
    base = rng.uniform(0, 255, 3)
    if kind == 0:
        img = np.broadcast_to(base, (n, n, 3)).astype(np.float32)
    elif kind == 1:
        other = rng.uniform(0, 255, 3)
        a = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:n, 0:n] / (n - 1)
        t = ((np.cos(a) * xx + np.sin(a) * yy) - min(0, np.cos(a)) - min(0, np.sin(a)))
        t = (t / (abs(np.cos(a)) + abs(np.sin(a))))[..., None]
        img = (base * (1 - t) + other * t).astype(np.float32)
    else:
        coarse = rng.uniform(-1, 1, (int(rng.integers(3, 8)),) * 2 + (3,)).astype(np.float32)
        img = base + 60 * cv2.resize(coarse, (n, n), interpolation=cv2.INTER_CUBIC)
    img = img + rng.normal(0, 4 + 10 * clutter, (n, n, 3))
    return np.clip(img, 0, 255).astype(np.float32)


def _contrasting_colour(rng: np.random.Generator, around: np.ndarray) -> tuple[float, float, float]:
    bg = around.reshape(-1, 3).mean(0)
    best, best_d = None, -1.0
    for _ in range(12):
        c = rng.uniform(0, 255, 3)
        d = float(np.abs(c - bg).sum())
        if d > best_d:
            best, best_d = c, d
        if d > 200:
            break
    return tuple(float(v) for v in best)  # type: ignore[union-attr]


def _clutter(rng: np.random.Generator, img: np.ndarray, clutter: float) -> None:
    n = img.shape[0]
    for _ in range(int(round(clutter * rng.integers(2, 7)))):
        p1, p2 = rng.uniform(-4, n + 4, 2), rng.uniform(-4, n + 4, 2)
        col = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cv2.line(img, tuple(int(v * _SS) for v in p1), tuple(int(v * _SS) for v in p2), col, 1,
                 cv2.LINE_AA, shift=2)
    for _ in range(int(round(clutter * rng.integers(4, 16)))):
        p = rng.uniform(0, n, 2)
        col = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cv2.circle(img, tuple(int(v * _SS) for v in p), int(rng.uniform(0.6, 1.6) * _SS), col, -1,
                   cv2.LINE_AA, shift=2)


def render(rng: np.random.Generator, label: int, cfg: SceneConfig = SceneConfig()):
    """One scene: ``(image (n, n, 3) uint8 RGB, mask (n, n) bool)`` for class ``label``."""
    n = cfg.size
    easy = cfg.easy > 0 and rng.random() < cfg.easy
    clutter = 0.0 if easy else cfg.clutter
    r = rng.uniform(*cfg.radius) * n / SIZE
    theta = rng.uniform(0, 2 * np.pi)
    if easy:  # the curriculum's first lessons: one clear shape near the middle of a plain field
        grey = rng.uniform(0, 80) if rng.random() < 0.5 else rng.uniform(175, 255)
        img = np.full((n, n, 3), grey, np.float32) + rng.normal(0, 3, (n, n, 3)).astype(np.float32)
        cx, cy = n / 2 + rng.uniform(-n / 8, n / 8, 2)
        colour = tuple(float(255 - grey + v) for v in rng.uniform(-30, 30, 3))
    else:
        img = _background(rng, n, clutter)
        _clutter(rng, img, clutter * 0.5)  # some clutter lies under the shape ...
        cx, cy = rng.uniform(r + 1, n - r - 1, 2)
        x0, x1, y0, y1 = int(max(cx - r, 0)), int(min(cx + r, n)), int(max(cy - r, 0)), int(min(cy + r, n))
        colour = _contrasting_colour(rng, img[y0:y1 + 1, x0:x1 + 1])
    mask = np.zeros((n, n), np.uint8)
    centre = (int(cx * _SS), int(cy * _SS))
    kind = CLASSES[label]
    if kind == "crescent":  # a disc with an offset disc cut out, drawn through an alpha canvas
        alpha = np.zeros((n, n), np.float32)
        cut = (int((cx + 0.45 * r * np.cos(theta)) * _SS), int((cy + 0.45 * r * np.sin(theta)) * _SS))
        cv2.circle(alpha, centre, int(r * _SS), 1.0, -1, cv2.LINE_AA, shift=2)
        cv2.circle(alpha, cut, int(0.8 * r * _SS), 0.0, -1, cv2.LINE_AA, shift=2)
        img[:] = img * (1 - alpha[..., None]) + np.array(colour, np.float32) * alpha[..., None]
        cv2.circle(mask, centre, int(r * _SS), 1, -1, cv2.LINE_8, shift=2)
        cv2.circle(mask, cut, int(0.8 * r * _SS), 0, -1, cv2.LINE_8, shift=2)
    elif kind in ("circle", "ring"):
        if kind == "circle":
            cv2.circle(img, centre, int(r * _SS), colour, -1, cv2.LINE_AA, shift=2)
            cv2.circle(mask, centre, int(r * _SS), 1, -1, cv2.LINE_8, shift=2)
        else:
            th = max(2, int(round(r * 0.35)))
            cv2.circle(img, centre, int((r - th / 2) * _SS), colour, th, cv2.LINE_AA, shift=2)
            cv2.circle(mask, centre, int((r - th / 2) * _SS), 1, th, cv2.LINE_8, shift=2)
    else:
        polys = [np.round((p + [cx, cy]) * _SS).astype(np.int32) for p in _polygon(kind, r, theta)]
        cv2.fillPoly(img, polys, colour, cv2.LINE_AA, shift=2)
        cv2.fillPoly(mask, polys, 1, cv2.LINE_8, shift=2)
    _clutter(rng, img, clutter * 0.5)  # ... and some over it, as in real photos
    return np.clip(img, 0, 255).astype(np.uint8), mask.astype(bool)


def sample(seed: int, index: int, cfg: SceneConfig = SceneConfig()):
    """Image ``index`` of the split ``seed``: ``(image, mask, label)``; deterministic."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(CLASSES)))
    img, mask = render(rng, label, cfg)
    return img, mask, label


def batch(seed: int, start: int, count: int, cfg: SceneConfig = SceneConfig()):
    """Images ``start .. start+count-1`` of split ``seed`` as stacked arrays."""
    items = [sample(seed, i, cfg) for i in range(start, start + count)]
    return (np.stack([it[0] for it in items]), np.stack([it[1] for it in items]),
            np.array([it[2] for it in items], dtype=np.int64))


def write_folder(out: str | Path, per_class: int, seed: int = 7, cfg: SceneConfig = SceneConfig(),
                 upscale: int = 1) -> Path:
    """Write a labelled sample: ``out/<class>/<i>.png`` with its mask ``<i>.mask.png``."""
    from PIL import Image

    out = Path(out)
    counts = {c: 0 for c in CLASSES}
    i = 0
    while min(counts.values()) < per_class:
        img, mask, label = sample(seed, i, cfg)
        i += 1
        name = CLASSES[label]
        if counts[name] >= per_class:
            continue
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        k = counts[name]
        im = Image.fromarray(img)
        mk = Image.fromarray(mask.astype(np.uint8) * 255)
        if upscale > 1:
            im = im.resize((img.shape[1] * upscale,) * 2, Image.NEAREST)
            mk = mk.resize((img.shape[1] * upscale,) * 2, Image.NEAREST)
        im.save(d / f"{name}_{k:03d}.png")
        mk.save(d / f"{name}_{k:03d}.mask.png")
        counts[name] += 1
    return out
