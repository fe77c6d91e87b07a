"""Raw attention of any layer and head for any query token, laid out over the patch grid."""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..families import TokenLayout


def query_maps(attention: np.ndarray, query: int, layout: TokenLayout) -> np.ndarray:
    """Attention from ``query`` to every patch, for every layer and head. (L, H, rows, cols).

    Values are the raw softmax weights (they do not sum to 1 over patches: the rest goes to
    prefix tokens).
    """
    if not 0 <= query < attention.shape[-1]:
        raise InputError(f"query token {query} is outside 0..{attention.shape[-1] - 1}", code="bad_query",
                         query=query, tokens=attention.shape[-1])
    rows = attention[:, :, query, layout.num_prefix:]  # (L, H, N)
    return rows.astype(np.float32).reshape(*rows.shape[:2], *layout.grid)


def prefix_share(attention: np.ndarray, query: int, num_prefix: int) -> np.ndarray:
    """How much of ``query``'s attention goes to prefix tokens, per layer and head. (L, H)."""
    return attention[:, :, query, :num_prefix].astype(np.float32).sum(-1)


def word_grid(words: int, patch_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(rows, cols) of TNT's ``words`` pixel words inside a patch of ``patch_size`` (h, w): the
    words keep the patch's shape (timm's ``PixelEmbed``: ceil(h / stride) × ceil(w / stride)),
    row-major."""
    ph, pw = patch_size if patch_size is not None else (1, 1)
    rows = max(1, min(words, int(round(np.sqrt(words * ph / max(pw, 1))))))
    while words % rows:
        rows -= 1
    return rows, words // rows


def inner_map(inner_attention: np.ndarray, patch: int, layer: int, head: int | None = None,
              query: int | None = None, patch_size: tuple[int, int] | None = None) -> np.ndarray:
    """TNT inner attention inside one patch, over its word grid (:func:`word_grid`): a query
    word's row when ``query`` is given, otherwise how much attention each word receives,
    averaged over the query words (the shares sum to 1).

    Args:
        inner_attention: ``(L, N, H_in, P_in, P_in)``.
        patch: patch index (row-major, no prefix).
        head: one head, or None for the mean over heads.
        patch_size: the patch's (h, w) in pixels, which gives the words' grid its shape (square
            when not given).
    """
    a = inner_attention[layer, patch].astype(np.float32)  # (H_in, P, P)
    a = a.mean(0) if head is None else a[head]
    w = a.mean(0) if query is None else a[query]  # (P,)
    return w.reshape(word_grid(w.shape[0], patch_size))


def token_norms(tokens: np.ndarray) -> np.ndarray:
    """L2 norm of every token at every depth, ``(L + 1, T)``: high-norm outliers among patch
    tokens are the artifact tokens register models were designed to absorb (Darcet et al. 2024)."""
    return np.linalg.norm(tokens.astype(np.float32), axis=-1)
