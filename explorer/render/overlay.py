"""Heatmap overlays and patch grids drawn with OpenCV; numpy in, RGB uint8 out.

OpenCV is about 7× faster than PIL/numpy blending at full photo size. This is the only module
that knows OpenCV's colour maps come out in BGR order.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import cv2
import numpy as np

from ..buffers import OVERLAYS, VALUES

COLORMAPS = {"inferno": cv2.COLORMAP_INFERNO, "jet": cv2.COLORMAP_JET, "turbo": cv2.COLORMAP_TURBO,
             "viridis": cv2.COLORMAP_VIRIDIS, "magma": cv2.COLORMAP_MAGMA}
_LUTS: dict[str, np.ndarray] = {}
#: pixels per band of rows when blending: each band costs seven OpenCV calls, whose Python overhead
#: two threads pay in turn (the GIL), so larger bands beat cache-sized ones: two 12-MP overlays
#: took 0.92-0.97 of the time with 1 << 17 as with 1 << 16 (medians of 21 rounds, three runs)
_BAND_PIXELS = 1 << 17
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


def normalise(m: np.ndarray, axis: tuple[int, ...] | None = None) -> np.ndarray:
    """Scale a map to [0, 1] (min to max); a constant map becomes zeros. ``axis``: a stack of
    maps, each normalised along these axes."""
    m = m.astype(np.float32)
    if axis is None:
        lo, hi = float(m.min()), float(m.max())
        return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    lo, hi = m.min(axis=axis, keepdims=True), m.max(axis=axis, keepdims=True)
    span = hi - lo
    return np.where(span > 0, (m - lo) / np.where(span > 0, span, 1), 0).astype(np.float32)


def heatmap(m: np.ndarray, size: tuple[int, int], colormap: str = "inferno",
            smooth: bool = True) -> np.ndarray:
    """A (rows, cols) map as an RGB heatmap of ``size`` = (width, height).

    The map is resized as values and then coloured with ``cv2.applyColorMap`` and our RGB table
    as a user colour map (numpy fancy indexing of a 12-MP image costs ~15× more).
    """
    return cv2.applyColorMap(_scaled_values(m, size, smooth), colormap_lut(colormap).reshape(256, 1, 3))


def _scaled_values(m: np.ndarray, size: tuple[int, int], smooth: bool,
                   out: np.ndarray | None = None) -> np.ndarray:
    """A map normalised to 0..255 and resized (as values) to ``size`` = (width, height). uint8,
    written into ``out`` when given."""
    u8 = np.round(normalise(m) * 255).astype(np.uint8)
    return cv2.resize(u8, size, dst=out, interpolation=cv2.INTER_CUBIC if smooth else cv2.INTER_NEAREST)


def overlay(image: np.ndarray, m: np.ndarray, *, box: tuple[float, float, float, float] | None = None,
            alpha: float = 0.5, colormap: str = "inferno", smooth: bool = True,
            dim_outside: float = 0.35) -> np.ndarray:
    """Blend a patch map over an RGB image at the image's own size.

    Args:
        image: ``(H, W, 3)`` uint8, the user's image.
        m: ``(rows, cols)`` map over the patch grid.
        box: the region ``(x0, y0, x1, y1)`` the model saw; the map covers it and the rest of the
            image is dimmed. None: the map covers the whole image.
        alpha: opacity of the heatmap, 0 to 1.

    Each pixel inside the box is ``round((1 - alpha) · pixel) + round(alpha · colour)``, within 1
    of the exact blend; outside it is ``round(dim_outside · pixel)``.
    """
    return overlays(image, [m], box=box, alpha=alpha, colormap=colormap, smooth=smooth,
                    dim_outside=dim_outside)[0]


@functools.lru_cache(maxsize=64)
def _packed_lut(colormap: str, alpha: float) -> np.ndarray:
    """``round(alpha · colour)`` of each of the 256 levels, its R, G, B packed in one int32 (the
    fourth byte 0): ``cv2.LUT`` with it colours a whole band in one 4-byte lookup per pixel,
    about 1.6× faster than ``cv2.applyColorMap``."""
    rgbx = np.zeros((256, 4), np.uint8)
    rgbx[:, :3] = np.round(colormap_lut(colormap).astype(np.float64) * alpha).astype(np.uint8)
    packed = rgbx.view(np.int32).reshape(256, 1)
    packed.flags.writeable = False  # shared by every call with these arguments
    return packed


def overlays(image: np.ndarray, maps: list[np.ndarray] | np.ndarray, *,
             box: tuple[float, float, float, float] | None = None, alpha: float = 0.5,
             colormap: str = "inferno", smooth: bool = True, dim_outside: float = 0.35) -> list[np.ndarray]:
    """:func:`overlay` of several maps over one image, made in one pass over the image.

    What does not depend on the map is computed once a band of rows and shared: the image scaled
    by ``1 - alpha`` inside the box and dimmed outside it. Each map then costs a colour lookup
    and a saturating add. With a forward pass between calls (nothing in cache, as in the
    benchmark), two overlays of a 12-MP photo made together took 0.71 of the time of two made with
    ``applyColorMap`` and ``addWeighted`` (0.89 made one at a time; paired medians of 21 rounds).
    """
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box if box is not None else (0, 0, w, h)
    ix0, iy0 = max(0, int(round(x0))), max(0, int(round(y0)))
    ix1, iy1 = min(w, max(ix0 + 1, int(round(x1)))), min(h, max(iy0 + 1, int(round(y1))))
    rw, rh = ix1 - ix0, iy1 - iy0
    # recycled once the caller lets go of an overlay
    outs = [OVERLAYS.array(image.shape, image.dtype) for _ in range(len(maps))]
    if not outs:
        return outs
    bigs = [_scaled_values(m, (rw, rh), smooth, VALUES.array((rh, rw), np.uint8)) for m in maps]
    alpha = min(1.0, max(0.0, float(alpha)))
    lut = _packed_lut(colormap, alpha)
    keep = 1.0 - alpha
    band = max(1, _BAND_PIXELS // rw)

    def dim(sl: Any) -> None:
        """Pixels outside the box: dimmed once, copied into the other overlays."""
        if image[sl].size:
            cv2.convertScaleAbs(image[sl], dst=outs[0][sl], alpha=dim_outside)
            for out in outs[1:]:
                np.copyto(out[sl], outs[0][sl])

    def rows(ya: int, yb: int) -> None:
        """Output rows ``ya .. yb``. Outside the box in a few calls; inside a band at a time, so
        that the band's image, colours and outputs stay in the CPU cache."""
        lo, hi = max(ya, iy0), min(yb, iy1)  # rows inside the box
        if lo >= hi:
            dim(np.s_[ya:yb])
            return
        for sl in (np.s_[ya:lo], np.s_[hi:yb], np.s_[lo:hi, :ix0], np.s_[lo:hi, ix1:]):
            dim(sl)
        scaled = np.empty((band, rw, 3), np.uint8)
        packed = np.empty((band, rw), np.int32)
        colour = np.empty((band, rw, 3), np.uint8)
        colour4 = packed.view(np.uint8).reshape(band, rw, 4)
        for y in range(lo, hi, band):
            y2 = min(hi, y + band)
            n = y2 - y
            cv2.convertScaleAbs(image[y:y2, ix0:ix1], dst=scaled[:n], alpha=keep)
            for out, big in zip(outs, bigs):
                cv2.LUT(big[y - iy0:y2 - iy0], lut, dst=packed[:n])
                cv2.cvtColor(colour4[:n], cv2.COLOR_RGBA2RGB, dst=colour[:n])
                cv2.add(scaled[:n], colour[:n], dst=out[y:y2, ix0:ix1])

    workers = _workers(h * w)
    if workers > 1:  # OpenCV releases the GIL: bands of rows on several cores
        cuts = [round(i * h / workers) for i in range(workers + 1)]
        list(_pool(workers).map(lambda i: rows(cuts[i], cuts[i + 1]), range(workers)))
    else:
        rows(0, h)
    return outs


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
    """A (R, C, rows, cols) stack of maps as one image of R×C heatmap tiles, each normalised.

    Each tile is :func:`heatmap` of its map with ``smooth=False``, made for the whole stack at once:
    the maps normalised together along their own axes, enlarged by OpenCV's nearest-neighbour
    rule, and coloured in one call (a call per tile cost 3-4 ms for 72 tiles).
    """
    R, C, rows, cols = maps.shape
    u8 = np.round(normalise(maps, axis=(2, 3)) * 255).astype(np.uint8)

    def nearest(n: int) -> np.ndarray:  # cv2.resize INTER_NEAREST: source index floor(x · n / size)
        return np.minimum(np.floor(np.arange(size) * (1.0 / (size / n))).astype(np.intp), n - 1)

    big = u8[:, :, nearest(rows)][:, :, :, nearest(cols)]  # (R, C, size, size)
    step = size + pad
    values = np.zeros((R * step + pad, C * step + pad), np.uint8)
    values[pad:, pad:].reshape(R, step, C, step)[:, :size, :, :size] = big.transpose(0, 2, 1, 3)
    out = cv2.applyColorMap(values, colormap_lut(colormap).reshape(256, 1, 3))
    for i in range(R + 1):  # white padding
        out[i * step:i * step + pad] = 255
    for j in range(C + 1):
        out[:, j * step:j * step + pad] = 255
    return out


def word_panels(patch: np.ndarray, shares: np.ndarray, *, size: int = 220, gap: int = 12,
                colormap: str = "inferno") -> np.ndarray:
    """TNT's inner attention inside one patch, as two panels side by side: the patch's pixels cut
    into their words (left) and the share of the attention each word receives (right), each cell
    labelled with its share in percent where it fits (black on bright colours, white on dark).

    The colours run from 0 (the colour map's first) to the largest share (its last), so that words
    with nearly equal shares look nearly equal, as the numbers say. Panels are ``size`` pixels tall
    and keep the patch's shape.

    Args:
        patch: ``(ph, pw, 3)`` uint8, the patch's pixels in the model's crop.
        shares: ``(rows, cols)`` over the words (they sum to 1; not finite counts as 0).
    """
    shares = np.nan_to_num(np.asarray(shares, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    rows, cols = shares.shape
    ph, pw = patch.shape[:2]
    height, width = size, max(1, int(round(size * pw / max(ph, 1))))
    left = cv2.resize(patch, (width, height), interpolation=cv2.INTER_NEAREST)
    left = patch_grid(left, (rows, cols), labels=False)
    top = float(shares.max())
    levels = np.round(np.clip(shares / top, 0, 1) * 255).astype(np.uint8) if top > 0 else np.zeros(shares.shape, np.uint8)
    big = cv2.resize(levels, (width, height), interpolation=cv2.INTER_NEAREST)
    right = patch_grid(cv2.applyColorMap(big, colormap_lut(colormap).reshape(256, 1, 3)), (rows, cols), labels=False)
    cw, ch = width / cols, height / rows
    if min(cw, ch) >= 28:  # the shares as numbers where they fit
        fs = min(0.55, min(cw, ch) / 100)
        colours = colormap_lut(colormap)[levels]
        for r in range(rows):
            for c in range(cols):
                text = f"{100 * shares[r, c]:.1f}%"
                (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, fs, 1)
                org = (int(c * cw + (cw - tw) / 2), int(r * ch + (ch + th) / 2))
                bright = float(colours[r, c] @ np.array([0.299, 0.587, 0.114])) > 140
                cv2.putText(right, text, org, cv2.FONT_HERSHEY_SIMPLEX, fs, (0, 0, 0) if bright else (255, 255, 255),
                            1, cv2.LINE_AA)
    out = np.full((height, 2 * width + gap, 3), 255, np.uint8)
    out[:, :width] = left
    out[:, width + gap:] = right
    return out
