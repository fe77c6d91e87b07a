"""Position-embedding similarity (Dosovitskiy et al. 2021, Fig. 7 centre) and sine-cosine references.

Each tile ``(r, c)`` of the figure is the cosine similarity of position ``(r, c)``'s embedding to
every other position's, laid out on the patch grid. Learned 1D embeddings that picked up the 2D
layout show rows and columns; the fixed 1D sine-cosine code (Vaswani et al. 2017) only knows the
raster order; the 2D code (half the channels for the row, half for the column, as in MAE) knows both.
"""
from __future__ import annotations

import functools

import numpy as np


def cosine_similarity(pos: np.ndarray) -> np.ndarray:
    """(N, D) embeddings -> (N, N) cosine similarities (computed in float64).

    The product is torch's: after a numpy (OpenBLAS) product, OpenBLAS's idle threads keep
    spinning on the cores, and the 12-MP overlays drawn next took 25-35 % longer."""
    import torch

    p = pos.astype(np.float64)
    p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    t = torch.from_numpy(p)
    return (t @ t.T).numpy().astype(np.float32)


def similarity_tiles(pos: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(N, D) -> (rows, cols, rows, cols): tile [r, c] is position (r, c)'s similarity to all."""
    rows, cols = grid
    if pos.shape[0] != rows * cols:
        raise ValueError(f"{pos.shape[0]} embeddings do not fill a {rows}×{cols} grid")
    return cosine_similarity(pos).reshape(rows, cols, rows, cols)


@functools.lru_cache(maxsize=8)
def reference_tiles(kind: str, n: int, dim: int, grid: tuple[int, int]) -> np.ndarray:
    """:func:`similarity_tiles` of the ``"1d"`` or ``"2d"`` sine-cosine code for ``n`` positions of
    width ``dim`` on ``grid``. They depend on nothing else, so they are kept (read-only): at 1369
    positions each costs a 1369×1369 product per view otherwise."""
    pos = sincos_1d(n, dim) if kind == "1d" else sincos_2d(grid, dim)
    tiles = similarity_tiles(pos, grid)
    tiles.flags.writeable = False
    return tiles


def sincos_1d(n: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """Transformer sine-cosine code of positions 0..n-1 (raster order). (n, dim)."""
    half = dim // 2
    omega = 1.0 / temperature ** (np.arange(half) / half)
    ang = np.arange(n)[:, None] * omega[None, :]
    out = np.zeros((n, dim))
    out[:, 0:2 * half:2], out[:, 1:2 * half:2] = np.sin(ang), np.cos(ang)
    return out.astype(np.float32)


def sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> np.ndarray:
    """2D sine-cosine code: half the channels encode the row, half the column. (rows*cols, dim)."""
    rows, cols = grid
    half = dim // 2
    r = sincos_1d(rows, half, temperature)  # (rows, half)
    c = sincos_1d(cols, dim - half, temperature)  # (cols, dim - half)
    return np.concatenate([np.repeat(r, cols, axis=0), np.tile(c, (rows, 1))], axis=1)


def neighbour_structure(pos: np.ndarray, grid: tuple[int, int], sim: np.ndarray | None = None) -> dict[str, float]:
    """For how many positions the most similar *other* position is a grid neighbour (8-connected).

    Returns the count, the share, and the chance share (a random other position is a neighbour).
    ``sim``: :func:`cosine_similarity` of ``pos`` when the caller has it (any shape of N×N values).
    """
    rows, cols = grid
    n = rows * cols
    sim = (cosine_similarity(pos) if sim is None else np.reshape(sim, (n, n))).astype(np.float64)
    np.fill_diagonal(sim, -np.inf)
    best = sim.argmax(1)
    r, c = np.divmod(np.arange(rows * cols), cols)
    br, bc = np.divmod(best, cols)
    hits = (np.abs(br - r) <= 1) & (np.abs(bc - c) <= 1)
    n_nb = np.array([sum(1 for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr or dc)
                         and 0 <= rr + dr < rows and 0 <= cc + dc < cols) for rr, cc in zip(r, c)])
    return {"count": int(hits.sum()), "total": int(rows * cols), "share": float(hits.mean()),
            "chance": float((n_nb / (rows * cols - 1)).mean())}
