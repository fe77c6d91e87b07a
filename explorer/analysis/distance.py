"""Mean attention distance (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", Fig. 7 right).

For one head: every patch query's attention over the patch keys (renormalised to sum to 1, so the
share sent to prefix tokens does not count), times the pixel distance between the two patch
centres, summed over keys and averaged over queries. In the paper some heads of the lowest
layers attend locally, others already globally, and the distance grows with depth.
"""
from __future__ import annotations

import numpy as np

from ..families import TokenLayout


def patch_distances(layout: TokenLayout) -> np.ndarray:
    """Pixel distance between the centres of every pair of patches. (N, N)."""
    rows, cols = layout.grid
    ph, pw = layout.patch_size
    yy, xx = np.meshgrid(np.arange(rows) * ph, np.arange(cols) * pw, indexing="ij")
    pts = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float64)
    return np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))


def mean_attention_distance(attention: np.ndarray, layout: TokenLayout) -> np.ndarray:
    """Mean attention distance in model-input pixels for every layer and head. (L, H).

    Per layer in torch (multi-threaded; float16 storage is read as it is): at 1370 tokens numpy's
    einsum over a float32 copy took ~1 s.
    """
    import torch

    d = torch.from_numpy(patch_distances(layout).astype(np.float32))  # (N, N)
    p = layout.num_prefix
    out = np.empty(attention.shape[:2], dtype=np.float64)
    with torch.inference_mode():
        for layer in range(attention.shape[0]):
            a = torch.from_numpy(np.ascontiguousarray(attention[layer, :, p:, p:])).float()  # (H, N, N)
            num = (a * d).sum(-1)  # (H, N): Σ_k a_qk · d_qk
            den = a.sum(-1).clamp_min(1e-12)  # renormalise over patch keys
            out[layer] = (num / den).mean(-1).double().numpy()
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
