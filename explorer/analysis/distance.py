"""Mean attention distance (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", Fig. 7 right).

For one head: every patch query's attention over the patch keys (renormalised to sum to 1, so the
share sent to prefix tokens does not count), times the pixel distance between the two patch
centres, summed over keys and averaged over queries. In the paper some heads of the lowest
layers attend locally, others already globally, and the distance grows with depth.
"""
from __future__ import annotations

import functools

import numpy as np

from ..families import TokenLayout


def patch_distances(layout: TokenLayout) -> np.ndarray:
    """Pixel distance between the centres of every pair of patches. (N, N), read-only.

    Kept per grid (at 1370 tokens it took 75 ms, and every capture needs it)."""
    return _patch_distances(tuple(layout.grid), tuple(layout.patch_size))


@functools.lru_cache(maxsize=8)
def _patch_distances(grid: tuple[int, int], patch_size: tuple[int, int]) -> np.ndarray:
    rows, cols = grid
    ph, pw = patch_size
    yy, xx = np.meshgrid(np.arange(rows) * ph, np.arange(cols) * pw, indexing="ij")
    pts = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float64)
    d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
    d.setflags(write=False)
    return d


#: float32 values handled at a time (one block of query rows of every head; fits in the CPU cache)
_CHUNK = 1 << 19


def mean_attention_distance(attention: np.ndarray, layout: TokenLayout) -> np.ndarray:
    """Mean attention distance in model-input pixels for every layer and head. (L, H).

    The reference computation from stored attention (an Explanation keeps the same figures,
    computed at capture from float32 attention: ``Explanation.attention_distance()``). Block of
    query rows by block, in torch: each block is converted to float32 (if stored as float16) in a
    buffer that stays in the CPU cache, and ``Σ_k a_qk·d_qk`` is a batched dot product (einsum),
    with no product array.
    """
    import torch

    p = layout.num_prefix
    a = torch.from_numpy(attention)
    L, H, T = a.shape[0], a.shape[1], a.shape[-1]
    N = T - p
    d = torch.from_numpy(patch_distances(layout).astype(np.float32))  # (N, N)
    rows = max(1, _CHUNK // (H * N))
    conv = torch.empty((H, rows, N), dtype=torch.float32)
    num = torch.empty((H, N), dtype=torch.float32)
    den = torch.empty((H, N), dtype=torch.float32)
    out = np.empty((L, H), dtype=np.float64)
    with torch.inference_mode():
        for layer in range(L):
            for r0 in range(0, N, rows):
                r1 = min(N, r0 + rows)
                blk = a[layer, :, p + r0:p + r1, p:]  # (H, r, N): patch queries to patch keys
                if blk.dtype != torch.float32:
                    blk = conv[:, :r1 - r0].copy_(blk)
                num[:, r0:r1] = torch.einsum("hqk,qk->hq", blk, d[r0:r1])  # Σ_k a_qk · d_qk
                torch.sum(blk, -1, out=den[:, r0:r1])  # renormalise over patch keys
            out[layer] = (num / den.clamp_min(1e-12)).mean(-1).double().numpy()
    return out


def uniform_distance(layout: TokenLayout) -> float:
    """Mean attention distance of a head that attends uniformly to every patch (global view)."""
    return float(patch_distances(layout).mean())


def conv_receptive_field(depth: int, kernel: int = 3) -> np.ndarray:
    """Receptive field, in pixels, after 1..depth stacked stride-1 convolutions: 3, 5, 7, ... (D,)."""
    return 1 + (kernel - 1) * np.arange(1, depth + 1)


def conv_mean_distance(depth: int, kernel: int = 3) -> np.ndarray:
    """Mean distance from the centre of a uniform k×k window the size of that receptive field:
    the "mean attention distance" a stack of 3×3 convolutions could at most reach. (D,)."""
    out = []
    for rf in conv_receptive_field(depth, kernel):
        r = np.arange(rf) - rf // 2
        yy, xx = np.meshgrid(r, r, indexing="ij")
        out.append(float(np.sqrt(yy ** 2 + xx ** 2).mean()))
    return np.array(out)
