"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

Each layer's attention is fused over heads, the residual connection is modelled as
``Â = 0.5·A + 0.5·I`` (rows renormalised), and attention is propagated through the stack as the
product ``Â_L · … · Â_s``. The row of one query token is a chain of vector–matrix products,
``O(L·T²)``; the full matrix chain, ``O(L·T³)``, is only computed when it is asked for.

The discard ratio (from Gildenblat's vit-explain, not in the paper) zeroes, in every row of the
fused attention, the weakest ``discard_ratio`` share of the links to patch tokens; links to
prefix tokens (class, distillation, registers) are never discarded.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

FUSIONS = ("mean", "max", "min")


@dataclass(frozen=True)
class RolloutOptions:
    """How rollout is computed; the defaults follow the paper."""

    head_fusion: str = "mean"  # "mean" (paper), "max" or "min" over heads
    discard_ratio: float = 0.0  # 0 keeps every link; 0.9 keeps the strongest 10 % per row
    start_layer: int = 0  # first layer included; later starts show what the top layers add
    residual: float = 0.5  # weight of the identity in Â = (1 - residual)·A + residual·I


def fuse(attn_layer: np.ndarray, opts: RolloutOptions, num_prefix: int) -> np.ndarray:
    """One layer's ``Â``: heads fused, weakest links discarded, identity mixed in. (T, T)."""
    return fused_layers(attn_layer[None], opts, num_prefix, first=0)[0]


def fused_layers(attention: np.ndarray, opts: RolloutOptions, num_prefix: int,
                 first: int | None = None) -> np.ndarray:
    """``Â`` of every layer from ``first`` (default ``opts.start_layer``) up. (L', T, T) float32.

    Computed with torch (multi-threaded, float16 storage read directly); callers that answer
    many queries keep the result (see :func:`rollout_row`'s ``fused``).
    """
    import torch

    if opts.head_fusion not in FUSIONS:
        raise InputError(f"head fusion must be one of {FUSIONS}, got {opts.head_fusion!r}",
                         code="bad_option", name="head_fusion")
    first = opts.start_layer if first is None else first
    a = torch.from_numpy(np.ascontiguousarray(attention[first:]))  # (L', H, T, T)
    with torch.inference_mode():
        if opts.head_fusion == "mean":
            f = a.float().mean(1) if a.dtype != torch.float32 else a.mean(1)
        elif opts.head_fusion == "max":
            f = a.amax(1).float()
        else:
            f = a.amin(1).float()
        if opts.discard_ratio > 0:
            patch = f[:, :, num_prefix:]  # (L', T, N) view
            k = int(patch.shape[-1] * opts.discard_ratio)
            if k > 0:  # exactly the k weakest links per row (ties would drop too many with a threshold)
                weakest = patch.topk(k, dim=-1, largest=False).indices
                patch.scatter_(-1, weakest, 0.0)
        f.mul_(1 - opts.residual)
        f.diagonal(dim1=-2, dim2=-1).add_(opts.residual)
        f.div_(f.sum(-1, keepdim=True))
        return f.numpy()


def _check(attention: np.ndarray, opts: RolloutOptions, query: int | None) -> None:
    if attention.ndim != 4:
        raise InputError(f"attention must be (L, H, T, T); got shape {attention.shape}", code="bad_shape")
    if not 0 <= opts.start_layer < attention.shape[0]:
        raise InputError(f"start layer {opts.start_layer} is outside 0..{attention.shape[0] - 1}",
                         code="bad_layer", layer=opts.start_layer, layers=attention.shape[0])
    if not 0.0 <= opts.discard_ratio < 1.0:
        raise InputError(f"discard ratio must lie in [0, 1); got {opts.discard_ratio}", code="bad_option",
                         name="discard_ratio")
    if query is not None and not 0 <= query < attention.shape[-1]:
        raise InputError(f"query token {query} is outside 0..{attention.shape[-1] - 1}",
                         code="bad_query", query=query, tokens=attention.shape[-1])


def rollout_row(attention: np.ndarray, query: int, opts: RolloutOptions = RolloutOptions(),
                num_prefix: int = 1, fused: np.ndarray | None = None) -> np.ndarray:
    """How much each token flows into ``query`` at the top: row ``query`` of the rollout. (T,)

    Args:
        attention: ``(L, H, T, T)`` attention of every layer and head.
        query: the token whose row is wanted (class token, a register, a patch ...).
        opts: head fusion, discard ratio, start layer.
        num_prefix: prefix tokens before the patches (never discarded).
        fused: :func:`fused_layers` for these ``opts``, when the caller keeps it.
    """
    _check(attention, opts, query)
    f = fused_layers(attention, opts, num_prefix) if fused is None else fused  # (L', T, T)
    v = np.zeros(attention.shape[-1], dtype=np.float32)  # float32 like Â: no upcast copy per layer
    v[query] = 1.0
    for layer in range(f.shape[0] - 1, -1, -1):  # top layer first: v ← v · Â_l
        v = v @ f[layer]
    return v


def rollout_matrix(attention: np.ndarray, opts: RolloutOptions = RolloutOptions(),
                   num_prefix: int = 1, fused: np.ndarray | None = None) -> np.ndarray:
    """The full rollout ``Â_L · … · Â_s``, every query at once. (T, T); O(L·T³)."""
    _check(attention, opts, None)
    f = fused_layers(attention, opts, num_prefix) if fused is None else fused
    r = np.eye(attention.shape[-1], dtype=np.float64)
    for layer in range(f.shape[0]):
        r = f[layer].astype(np.float64) @ r
    return r.astype(np.float32)


def patch_map(row: np.ndarray, num_prefix: int, grid: tuple[int, int]) -> np.ndarray:
    """The patch part of a rollout row as a ``(rows, cols)`` map that sums to 1."""
    m = np.asarray(row[num_prefix:], dtype=np.float64).reshape(grid)
    s = m.sum()
    return (m / s if s > 0 else m).astype(np.float32)


def object_patches(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(rows, cols) bool: the patches that overlap a mask given at the model input's resolution."""
    rows, cols = grid
    h, w = mask.shape
    return mask.reshape(rows, h // rows, cols, w // cols).any(axis=(1, 3))


def mass_on(mask_patches: np.ndarray, patch_weights: np.ndarray) -> dict[str, float]:
    """Share of a patch map on masked patches, the share of patches they are, and the ratio.

    Args:
        mask_patches: ``(rows, cols)`` bool, patches that overlap the object.
        patch_weights: ``(rows, cols)`` non-negative map (normalised here).
    """
    w = patch_weights / max(float(patch_weights.sum()), 1e-12)
    mass = float(w[mask_patches].sum())
    area = float(mask_patches.mean())
    return {"mass": mass, "area": area, "ratio": mass / area if area > 0 else float("nan"),
            "max_on_object": bool(mask_patches.flat[int(np.argmax(w))])}
