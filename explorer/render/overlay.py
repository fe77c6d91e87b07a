"""Heatmap overlays and patch grids drawn with OpenCV; numpy in, RGB uint8 out.

OpenCV is about 7× faster than PIL/numpy blending at full photo size. This is the only module
that knows OpenCV's colour maps come out in BGR order.
"""
from __future__ import annotations

import os
from typing import Any

import cv2
import numpy as np

from ..buffers import OVERLAYS

COLORMAPS = {"inferno": cv2.COLORMAP_INFERNO, "jet": cv2.COLORMAP_JET, "turbo": cv2.COLORMAP_TURBO,
             "viridis": cv2.COLORMAP_VIRIDIS, "magma": cv2.COLORMAP_MAGMA}
_LUTS: dict[str, np.ndarray] = {}
_BAND_PIXELS = 1 << 16  # pixels per band of rows when blending
_PARALLEL_PIXELS = 1 << 20  # images from this size are blended on several threads
_POOLS: dict[int, Any] = {}


def _workers(pixels: int) -> int:
    return 1 if pixels < _PARALLEL_PIXELS else max(1, min(4, cv2.getNumThreads(), os.cpu_count() or 1))


def _pool(workers: int):
    from concurrent.futures import ThreadPoolExecutor

    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="overlay")
    return _POOLS[workers]


def colormap_lut(name: str = "inferno") -> np.ndarray:
    """The colour map as a (256, 3) RGB uint8 table."""
    if name not in _LUTS:
        ramp = np.arange(256, dtype=np.uint8).reshape(256, 1)
        _LUTS[name] = cv2.applyColorMap(ramp, COLORMAPS[name])[:, 0, ::-1].copy()
    return _LUTS[name]


def normalise(m: np.ndarray) -> np.ndarray:
    """Scale a map to [0, 1] (min to max); a constant map becomes zeros."""
    m = m.astype(np.float32)
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def heatmap(m: np.ndarray, size: tuple[int, int], colormap: str = "inferno",
            smooth: bool = True) -> np.ndarray:
    """A (rows, cols) map as an RGB heatmap of ``size`` = (width, height).

    The map is resized as values and then coloured with ``cv2.applyColorMap`` and our RGB table
    as a user colour map (numpy fancy indexing of a 12-MP image costs ~15× more).
    """
    return cv2.applyColorMap(_scaled_values(m, size, smooth), colormap_lut(colormap).reshape(256, 1, 3))


def _scaled_values(m: np.ndarray, size: tuple[int, int], smooth: bool) -> np.ndarray:
    """A map normalised to 0..255 and resized (as values) to ``size`` = (width, height). uint8."""
    u8 = np.round(normalise(m) * 255).astype(np.uint8)
    return cv2.resize(u8, size, interpolation=cv2.INTER_CUBIC if smooth else cv2.INTER_NEAREST)


def overlay(image: np.ndarray, m: np.ndarray, *, box: tuple[float, float, float, float] | None = None,
            alpha: float = 0.5, colormap: str = "inferno", smooth: bool = True,
            dim_outside: float = 0.35) -> np.ndarray:
    """Blend a patch map over an RGB image at the image's own size.

    Args:
        image: ``(H, W, 3)`` uint8, the user's image.
        m: ``(rows, cols)`` map over the patch grid.
        box: the region ``(x0, y0, x1, y1)`` the model saw; the map covers it and the rest of the
            image is dimmed. None: the map covers the whole image.
        alpha: opacity of the heatmap.
    """
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box if box is not None else (0, 0, w, h)
    ix0, iy0 = max(0, int(round(x0))), max(0, int(round(y0)))
    ix1, iy1 = min(w, max(ix0 + 1, int(round(x1)))), min(h, max(iy0 + 1, int(round(y1))))
    out = OVERLAYS.array(image.shape, image.dtype)  # recycled once the caller lets go of an overlay
    rw, rh = ix1 - ix0, iy1 - iy0
    big = _scaled_values(m, (rw, rh), smooth)
    lut = colormap_lut(colormap).reshape(256, 1, 3)
    band = max(1, _BAND_PIXELS // w)

    def rows(ya: int, yb: int) -> None:
        """Output rows ``ya .. yb``, a band at a time: the band's photo, heatmap and output stay
        in the CPU cache (colouring the whole region first, then blending, read it all twice)."""
        for y in range(ya, yb, band):
            y2 = min(yb, y + band)
            lo, hi = max(y, iy0), min(y2, iy1)  # the band's rows inside the box
            if lo >= hi:
                cv2.convertScaleAbs(image[y:y2], dst=out[y:y2], alpha=dim_outside)
                continue
            for sl in (np.s_[y:lo], np.s_[hi:y2], np.s_[lo:hi, :ix0], np.s_[lo:hi, ix1:]):
                if image[sl].size:  # outside the box: dimmed
                    cv2.convertScaleAbs(image[sl], dst=out[sl], alpha=dim_outside)
            hm = cv2.applyColorMap(big[lo - iy0:hi - iy0], lut)
            cv2.addWeighted(image[lo:hi, ix0:ix1], 1.0 - alpha, hm, alpha, 0.0, dst=out[lo:hi, ix0:ix1])

    workers = _workers(h * w)
    if workers > 1:  # OpenCV releases the GIL: bands of rows on several cores
        cuts = [round(i * h / workers) for i in range(workers + 1)]
        list(_pool(workers).map(lambda i: rows(cuts[i], cuts[i + 1]), range(workers)))
    else:
        rows(0, h)
    return out


def _font_scale(cell: float) -> float:
    return max(0.25, min(0.6, cell / 60.0))


def patch_grid(image: np.ndarray, grid: tuple[int, int], *, first_index: int = 0,
               highlight: int | None = None, labels: bool = True,
               colour: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Draw the patch grid with token indices over an image that is exactly the model's crop
    (any size: the grid is scaled). ``highlight``: a patch index to outline."""
    h, w = image.shape[:2]
    rows, cols = grid
    out = image.copy()
    thick = max(1, round(min(h, w) / 400))
    for r in range(1, rows):
        y = round(r * h / rows)
        cv2.line(out, (0, y), (w - 1, y), colour, thick, cv2.LINE_AA)
    for c in range(1, cols):
        x = round(c * w / cols)
        cv2.line(out, (x, 0), (x, h - 1), colour, thick, cv2.LINE_AA)
    cw, ch = w / cols, h / rows
    if labels and min(cw, ch) >= 14:
        fs = _font_scale(min(cw, ch))
        for r in range(rows):
            for c in range(cols):
                text = str(first_index + r * cols + c)
                org = (int(c * cw + 2), int(r * ch + 2 + 12 * fs * 1.6))
                cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, fs, (0, 0, 0), 3, cv2.LINE_AA)
                cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, fs, colour, 1, cv2.LINE_AA)
    if highlight is not None:
        r, c = divmod(highlight, cols)
        cv2.rectangle(out, (int(c * cw), int(r * ch)), (int((c + 1) * cw) - 1, int((r + 1) * ch) - 1),
                      (0, 255, 255), max(2, thick * 2), cv2.LINE_AA)
    return out


def mark_patch(image: np.ndarray, grid: tuple[int, int], patch: int, *,
               box: tuple[float, float, float, float] | None = None,
               colour: tuple[int, int, int] = (0, 255, 255), copy: bool = True) -> np.ndarray:
    """Outline one patch (the current query) on an image, inside ``box`` when given. ``copy=False``
    draws on ``image`` itself (an overlay just made: copying 12 MP costs ~10 ms)."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box if box is not None else (0, 0, w, h)
    rows, cols = grid
    r, c = divmod(patch, cols)
    cw, ch = (x1 - x0) / cols, (y1 - y0) / rows
    out = image.copy() if copy else image
    t = max(2, round(min(h, w) / 250))
    cv2.rectangle(out, (int(x0 + c * cw), int(y0 + r * ch)), (int(x0 + (c + 1) * cw), int(y0 + (r + 1) * ch)),
                  colour, t, cv2.LINE_AA)
    return out


def mask_outline(image: np.ndarray, mask: np.ndarray, *, box: tuple[float, float, float, float] | None = None,
                 colour: tuple[int, int, int] = (0, 255, 0), copy: bool = True) -> np.ndarray:
    """Draw the outline of a binary mask (given at the model crop's resolution) over the image
    (``copy=False``: on the image itself)."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box if box is not None else (0, 0, w, h)
    bw, bh = max(1, int(round(x1 - x0))), max(1, int(round(y1 - y0)))
    m = cv2.resize(mask.astype(np.uint8) * 255, (bw, bh), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = image.copy() if copy else image
    cv2.drawContours(out, [c + np.array([[int(round(x0)), int(round(y0))]]) for c in contours], -1, colour,
                     max(1, round(min(h, w) / 300)), cv2.LINE_AA)
    return out


def upscale_nearest(image: np.ndarray, min_side: int = 384, max_side: int | None = None) -> np.ndarray:
    """Enlarge a small image (a 64-px classroom scene) by a whole factor so it shows crisply on a
    projector: its short side to at least ``min_side``, its long side to at most ``max_side``."""
    h, w = image.shape[:2]
    k = int(np.ceil(min_side / max(1, min(h, w))))
    if max_side is not None:
        k = min(k, max_side // max(1, h, w))
    k = max(1, k)
    return image if k == 1 else cv2.resize(image, (w * k, h * k), interpolation=cv2.INTER_NEAREST)


def fit_for_display(image: np.ndarray, min_side: int, max_side: int) -> np.ndarray:
    """An image sized for a view: shrunk (area-averaged) when its long side is over ``max_side``,
    else enlarged by :func:`upscale_nearest` (never past ``max_side``)."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return upscale_nearest(image, min_side, max_side)
    k = max_side / max(h, w)
    return cv2.resize(image, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA)


def tile_maps(maps: np.ndarray, *, size: int = 72, pad: int = 2, colormap: str = "inferno") -> np.ndarray:
    """A (R, C, rows, cols) stack of maps as one image of R×C heatmap tiles, each normalised."""
    R, C = maps.shape[:2]
    out = np.full((R * (size + pad) + pad, C * (size + pad) + pad, 3), 255, np.uint8)
    for i in range(R):
        for j in range(C):
            y, x = pad + i * (size + pad), pad + j * (size + pad)
            out[y:y + size, x:x + size] = heatmap(maps[i, j], (size, size), colormap, smooth=False)
    return out
