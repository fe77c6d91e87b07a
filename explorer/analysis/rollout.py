"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

Each layer's attention is fused over heads, the residual connection is modelled as
``Â = 0.5·A + 0.5·I`` (rows renormalised), and attention is propagated through the stack as the
product ``Â_L · … · Â_s``. The row of one query token is a chain of vector–matrix products,
``O(L·T²)``; the full matrix chain, ``O(L·T³)``, is only computed when it is asked for.

The discard ratio zeroes, in every row of the fused attention, the weakest ``discard_ratio``
share of the links to patch tokens; links to prefix tokens (class, distillation, registers) are
never discarded. The idea comes from Gildenblat's vit-explain (not in the paper), which drops
the weakest share of each layer's whole matrix at once and protects only the class token's link
to itself; per row, every query keeps the same number of links, which is what the app's slider
says ("weakest links removed per row"). The two differ only when a ratio is set.
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


#: float32 values converted at a time when reading float16 attention (fits in the CPU cache)
_CHUNK = 1 << 19


def fused_layers(attention: np.ndarray, opts: RolloutOptions, num_prefix: int,
                 first: int | None = None, head_mean: np.ndarray | None = None,
                 ranks: np.ndarray | None = None, nonnegative: bool = False) -> np.ndarray:
    """``Â`` of every layer from ``first`` (default ``opts.start_layer``) up. (L', T, T) float32.

    Computed with torch a layer at a time, each layer fused, discarded and renormalised while it
    is in the CPU cache, into one output array. ``head_mean``: the (L, T, T) head means when the
    caller has them (an Explanation keeps them from capture), used for mean fusion instead of
    averaging the stored attention again. ``ranks``: :func:`link_ranks` for this head fusion (and
    the same ``head_mean``), when the caller keeps them: the discard is then one comparison per
    link instead of a selection in every row. ``nonnegative``: the caller knows every weight is
    ``>= 0`` (a softmax's), which spares a check per layer. Callers that answer many queries keep
    :func:`fused_sums` instead, which skips the division.
    """
    return _fuse(attention, opts, num_prefix, first, head_mean, ranks, nonnegative, normalise=True)[0]


def fused_sums(attention: np.ndarray, opts: RolloutOptions, num_prefix: int,
               head_mean: np.ndarray | None = None, ranks: np.ndarray | None = None,
               nonnegative: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fused_layers` before the rows are renormalised: ``(F, s)`` with ``F`` the (L', T, T)
    fused layers (weakest links discarded) and ``s = (1 - r)·F·1 + r`` their (L', T) row sums with
    the identity mixed in, so that ``Â = diag(1/s)·((1 - r)·F + r·I)``. :func:`rollout_row` takes
    them as ``raw``: a layer then costs one matrix–vector product and the fusion one pass fewer
    (1370 tokens: 7 ms of a slider event)."""
    return _fuse(attention, opts, num_prefix, None, head_mean, ranks, nonnegative, normalise=False)


def _fuse(attention: np.ndarray, opts: RolloutOptions, num_prefix: int, first: int | None,
          head_mean: np.ndarray | None, ranks: np.ndarray | None, nonnegative: bool,
          normalise: bool) -> tuple[np.ndarray, np.ndarray]:
    import torch

    _check_fusion(opts.head_fusion)
    first = opts.start_layer if first is None else first
    from ..buffers import FUSED

    a = torch.from_numpy(attention[first:])  # (L', H, T, T), a view
    L, T = a.shape[0], a.shape[-1]
    if ranks is not None and ranks.shape != (attention.shape[0], T, T):
        raise ValueError(f"ranks of shape {ranks.shape} do not fit attention of shape {attention.shape}")
    f = FUSED.empty((L, T, T), torch.float32)  # 86 MB at 1370 tokens: fresh pages cost 30 ms
    sums = torch.empty((L, T), dtype=torch.float32)
    k = int((T - num_prefix) * opts.discard_ratio) if opts.discard_ratio > 0 else 0
    scratch = torch.empty((T, T), dtype=torch.int16) if a.dtype == torch.float16 else None
    hm = torch.from_numpy(head_mean[first:]) if head_mean is not None and opts.head_fusion == "mean" else None
    ranked = k > 0 and ranks is not None
    r = opts.residual

    def fuse(layer: int) -> None:
        _fuse_heads(a[layer], opts.head_fusion, f[layer], None if hm is None else hm[layer], scratch, nonnegative)

    with torch.inference_mode():
        if ranked and hm is not None:  # the head means masked straight into f: one pass
            _keep_ranked(hm.numpy(), ranks[first:], k, f.numpy())
        elif k > 0:
            for layer in range(L):
                fuse(layer)
            if ranked:  # the k weakest of each row are the links ranked below k
                _keep_ranked(f.numpy(), ranks[first:], k, f.numpy())
            else:  # a selection in every row (two threads)
                discard_weakest(f[:, :, num_prefix:], k)
        for layer in range(L):  # (without discarding, fused and summed while in the CPU cache)
            if k == 0:
                fuse(layer)
            s = torch.sum(f[layer], -1, out=sums[layer]).mul_(1 - r).add_(r)
            if normalise:  # rows of r·I + (1 - r)·F over s: F·(1 - r)/s, plus r/s on the diagonal
                f[layer].mul_(torch.div(1 - r, s)[:, None])
                f[layer].diagonal().add_(torch.div(r, s))
    return f.numpy(), sums.numpy()


def _check_fusion(fusion: str) -> None:
    if fusion not in FUSIONS:
        raise InputError(f"head fusion must be one of {FUSIONS}, got {fusion!r}",
                         code="bad_option", name="head_fusion")


def _fuse_heads(a_layer, fusion: str, out, head_mean=None, scratch=None, nonnegative: bool = False) -> None:
    """One layer's (H, T, T) attention fused over heads into ``out`` (T, T) float32 (torch).
    ``scratch``: a (T, T) int16 tensor to reuse for float16 max and min; ``nonnegative``: no
    weight is negative (no need to check)."""
    import torch

    if fusion == "mean" and head_mean is not None:
        out.copy_(head_mean)
    elif fusion == "mean":
        H = a_layer.shape[0]
        if a_layer.dtype == torch.float32:
            torch.sum(a_layer, 0, out=out)
        else:  # float16: a head at a time (1370 tokens: 1.4× faster than converting then summing)
            out.copy_(a_layer[0])
            for h in range(1, H):
                out.add_(a_layer[h])
        out.div_(H)
    elif a_layer.dtype == torch.float16:
        # Non-negative float16 values order as their bits do, as int16; torch's int16 max is
        # vectorised where its float16 max converts: 1370 tokens, 12 layers 28 → 14 ms. A negative
        # result means a negative weight (never from a softmax): then the float path.
        bits = a_layer.view(torch.int16)
        if scratch is None:
            scratch = torch.empty(out.shape, dtype=torch.int16)
        (torch.amax if fusion == "max" else torch.amin)(bits, 0, out=scratch)
        if nonnegative or int(scratch.min()) >= 0:
            out.copy_(scratch.view(torch.float16))
        else:
            out.copy_(a_layer.amax(0) if fusion == "max" else a_layer.amin(0))
    else:
        out.copy_(a_layer.amax(0) if fusion == "max" else a_layer.amin(0))


def link_ranks(attention: np.ndarray, fusion: str, num_prefix: int,
               head_mean: np.ndarray | None = None, nonnegative: bool = False) -> np.ndarray:
    """Each link's place in its row of the head-fused attention, weakest first: (L, T, T) int16
    (int32 past 32,767 tokens). Equal links are ranked by index, as a stable sort orders them;
    prefix columns (never discarded) get the dtype's maximum.

    Discarding the k weakest links of every row is then ``rank >= k``, one pass over the layers
    for any ratio, where :func:`discard_weakest` selects in every row again (DINOv2-S at 1370
    tokens, fused layers with a discard ratio: 105 ms by selection, 47 ms from the ranks), and
    :func:`ranked_rollout_row` applies it on the way without writing any layer (18 ms). Built
    once per head fusion by sorting every row on ``(value bits, index)`` keys (numpy's sort, rows
    on two threads): 0.3-0.5 s and 45 MB at 1370 tokens, 10 ms at 197.
    """
    import torch

    _check_fusion(fusion)
    L, T = attention.shape[0], attention.shape[-1]
    width = T - num_prefix
    dtype = np.int16 if width <= np.iinfo(np.int16).max else np.int32
    ranks = np.empty((L, T, T), dtype=dtype)
    ranks[:, :, :num_prefix] = np.iinfo(dtype).max
    if width <= 0:  # prefix tokens only: nothing is ever discarded
        return ranks
    shift = int(max(1, width - 1)).bit_length()
    vals = torch.empty((T, T), dtype=torch.float32)
    scratch = torch.empty((T, T), dtype=torch.int16)

    columns = torch.arange(width, dtype=torch.int16 if dtype == np.int16 else torch.int32).expand(T, width)
    order = np.empty((T, width), dtype=np.int64)  # each row's column indices, weakest link first
    key_rows = np.empty((T, width), dtype=np.int64)  # reused: fresh pages in two threads cost 2×

    def sort_rows(lo: int, hi: int) -> None:
        keys = key_rows[lo:hi]
        keys[...] = vals.numpy()[lo:hi, num_prefix:].view(np.int32)
        if keys.min() < 0:  # negative values: their bits order backwards
            np.copyto(keys, keys ^ 0x7FFFFFFF, where=keys < 0)
        keys <<= shift
        keys |= np.arange(width, dtype=np.int64)
        keys.sort(axis=-1)  # distinct keys: any sort is stable on (value, index)
        np.bitwise_and(keys, (1 << shift) - 1, out=order[lo:hi])

    a = torch.from_numpy(attention)
    with torch.inference_mode():
        for layer in range(L):
            _fuse_heads(a[layer], fusion, vals, None if head_mean is None else torch.from_numpy(head_mean[layer]),
                        scratch, nonnegative)
            _split(sort_rows, T, at=256)  # numpy's sort releases the GIL: two threads
            # rank[order[j]] = j (torch's scatter: 8× numpy's put_along_axis)
            torch.from_numpy(ranks[layer, :, num_prefix:]).scatter_(-1, torch.from_numpy(order), columns)
    return ranks


def _keep_ranked(src: np.ndarray, ranks: np.ndarray, k: int, out: np.ndarray) -> None:
    """``out = src · (ranks >= k)`` layer by layer (``out`` may be ``src``), layers on two threads."""
    def layers(i: int, step: int) -> None:
        keep = np.empty(src.shape[1:], dtype=bool)
        for layer in range(i, src.shape[0], step):
            np.greater_equal(ranks[layer], k, out=keep)
            np.multiply(src[layer], keep, out=out[layer])

    if src.shape[0] > 1 and src[0].size >= 1 << 16:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda i: layers(i, 2), range(2)))
    else:
        layers(0, 1)


def discard_weakest(links, k: int) -> None:
    """Zero exactly the ``k`` weakest entries of every row of ``links`` (a float32 torch view, in
    place): everything below the k-th smallest value, and of the entries equal to it the first
    ones by index until k are gone.

    The k-th value of each row is found by selection (numpy's introselect, rows split over two
    threads), not by sorting: for the 12 layers of a 1370-token model ``topk`` took 1.1 s,
    ``kthvalue`` 0.7 s, this 0.2 s. Rows are selected and zeroed a few hundred at a time, while
    they are in cache (selecting all, then zeroing: 0.1 s, half of it zeroing).

    Ties at the k-th value are common when the links come from float16 attention (max or min
    fusion of heads stored in float16: most rows). Tied rows are selected on keys that make every
    entry distinct and keep the order, ``(value bits, index)`` as one int64, so the k-th key marks
    exactly the k to drop; when a sample of rows says most rows tie, every row goes that way at
    once (1370 tokens, max fusion from float16: 0.3 s where masking the ties took 0.5–1.1 s).
    """
    import torch

    if links.ndim == 1:
        return discard_weakest(links[None], k)
    if links.dtype != torch.float32:
        raise TypeError(f"discard_weakest works on float32 links, not {links.dtype}")
    x = links.numpy()
    flat = x.reshape(-1, x.shape[-1])
    n = flat.shape[0]
    sample = flat[::max(1, n // 64)][:64]
    if n >= 256 and np.mean(_kth_pair(sample, k)[:, 2]) > 0.5:
        _split(lambda lo, hi: _by_blocks(flat, lo, hi, lambda blk: _drop_by_keys(blk, k)), n)
        return

    def select(blk: np.ndarray) -> None:
        kth = _kth_pair(blk, k)  # k-th and (k+1)-th smallest of each row, tied or not
        tied = np.flatnonzero(kth[:, 2])
        rows = blk[tied]  # a copy of the tied rows, settled on distinct keys
        np.multiply(blk, blk > kth[:, :1], out=blk)  # keep what is above the k-th value
        if tied.size:
            _drop_by_keys(rows, k)
            blk[tied] = rows

    _split(lambda lo, hi: _by_blocks(flat, lo, hi, select), n)  # numpy releases the GIL: two threads


#: rows selected and zeroed together by :func:`discard_weakest` (1.4 MB at 1370 tokens)
_ROWS = 256


def _by_blocks(flat: np.ndarray, lo: int, hi: int, fn) -> None:
    """``fn`` on rows ``lo .. hi`` of ``flat`` a few hundred at a time: its temporaries (a partitioned
    copy, int64 keys, masks) stay in cache and are never fresh pages."""
    for c0 in range(lo, hi, _ROWS):
        fn(flat[c0:min(hi, c0 + _ROWS)])


def _kth_pair(rows: np.ndarray, k: int) -> np.ndarray:
    """(n, 3): each row's k-th and (k+1)-th smallest value, and 1 where a tie between them matters
    (tied zeros do not: zeroing them changes nothing)."""
    part = np.partition(rows, k - 1, axis=-1)  # (two kth at once: 5× slower)
    out = np.empty((rows.shape[0], 3), dtype=rows.dtype)
    out[:, 0] = part[:, k - 1]
    out[:, 1] = part[:, k:].min(-1) if k < part.shape[-1] else np.inf
    out[:, 2] = (out[:, 0] == out[:, 1]) & (out[:, 0] != 0)
    return out


def _drop_by_keys(rows: np.ndarray, k: int) -> None:
    """Zero exactly the k smallest of each float32 row in place, the first by index among equals."""
    width = rows.shape[-1]
    bits = rows.view(np.int32).astype(np.int64)
    bits = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # the float order, negative values included
    keys = (bits << int(width - 1).bit_length()) | np.arange(width, dtype=np.int64)
    cut = np.partition(keys, k - 1, axis=-1)[:, k - 1:k]
    rows *= keys > cut


def _split(fn, n: int, at: int = 4096) -> None:
    """``fn(lo, hi)`` over rows ``0 .. n``, in two halves on two threads from ``at`` rows."""
    if n >= at:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda i: fn(i * n // 2, (i + 1) * n // 2), range(2)))
    else:
        fn(0, n)


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
                num_prefix: int = 1, fused: np.ndarray | None = None,
                head_mean: np.ndarray | None = None,
                raw: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """How much each token flows into ``query`` at the top: row ``query`` of the rollout. (T,)

    Args:
        attention: ``(L, H, T, T)`` attention of every layer and head.
        query: the token whose row is wanted (class token, a register, a patch ...).
        opts: head fusion, discard ratio, start layer.
        num_prefix: prefix tokens before the patches (never discarded).
        fused: :func:`fused_layers` for these ``opts``, when the caller keeps it.
        head_mean: the (L, T, T) head means, when the caller keeps them (mean fusion, nothing
            discarded: the row is then computed from them directly).
        raw: :func:`fused_sums` for these ``opts``, when the caller keeps them.
    """
    import torch

    _check(attention, opts, query)
    if raw is not None:
        return _chain(raw[0], raw[1], query, opts.residual)
    if fused is None and opts.head_fusion == "mean" and opts.discard_ratio == 0:
        if head_mean is not None:
            return _chain(head_mean[opts.start_layer:], None, query, opts.residual)
        return _mean_row(attention, query, opts)
    f = torch.from_numpy(fused_layers(attention, opts, num_prefix, head_mean=head_mean)
                         if fused is None else fused)  # (L', T, T)
    v = torch.zeros(attention.shape[-1], dtype=torch.float32)
    v[query] = 1.0
    with torch.inference_mode():
        for layer in range(f.shape[0] - 1, -1, -1):  # top layer first: v ← v · Â_l
            v = torch.mv(f[layer].T, v)  # torch's matrix–vector product: ~3× numpy's v @ M here
    return v.numpy()


def _chain(m: np.ndarray, sums: np.ndarray | None, query: int, r: float) -> np.ndarray:
    """:func:`rollout_row` from unnormalised layers ``M_l`` (head means, or :func:`fused_sums`):
    ``v ← (1 - r)·w·M_l + r·w`` with ``w = v / s_l`` and ``s_l = (1 - r)·M_l·1 + r`` (the rows
    of ``Â`` renormalised, as :func:`fused_layers` does), from the top layer down. ``sums``: the
    ``s_l`` when known, else one more matrix–vector product per layer. The top layer, where ``v``
    is the query's unit vector, reads only the query's row."""
    import torch

    mt = torch.from_numpy(m)
    with torch.inference_mode():
        top = mt[-1, query]
        s_q = float(sums[-1, query]) if sums is not None else (1 - r) * float(top.sum()) + r
        w_q = torch.tensor(1.0, dtype=torch.float32) / s_q
        v = (1 - r) * w_q * top
        v[query] += r * w_q
        ones = torch.ones(mt.shape[-1], dtype=torch.float32)
        for layer in range(mt.shape[0] - 2, -1, -1):
            s = torch.from_numpy(sums[layer]) if sums is not None else (1 - r) * torch.mv(mt[layer], ones) + r
            w = v / s
            v = (1 - r) * torch.mv(mt[layer].T, w) + r * w
    return v.numpy()


#: rows of a layer that :func:`ranked_rollout_row` masks, sums and multiplies together (1.4 MB of
#: float32 at 1370 tokens: they stay in the CPU cache between the three)
_RANKED_ROWS = 256


def ranked_rollout_row(fused: np.ndarray, ranks: np.ndarray, k: int, query: int,
                       residual: float = 0.5) -> np.ndarray:
    """Row ``query`` of the rollout with the ``k`` weakest links of every row discarded, straight
    from the head-fused layers and their :func:`link_ranks`: the discarded layers are never
    written. (T,) float32.

    Args:
        fused: ``(L', T, T)`` float32, the layers from the start layer up, heads fused (the head
            means, or :func:`fused_sums` without a discard ratio), nothing discarded or divided.
        ranks: ``(L', T, T)``, :func:`link_ranks` of the same layers.
        k: links dropped from every row (``rank < k``), at least 1.

    Each layer, from the top down, is read a block of rows at a time: the block is masked
    (``rank >= k``), summed and multiplied by the vector while it is in the CPU cache, and blocks
    where the vector is zero are skipped (the top layer costs one block). Rows are split over two
    threads from 1024 tokens (numpy releases the GIL). The arithmetic of :func:`fused_layers` and
    :func:`rollout_row`; at 1370 tokens 18 ms, where discarding into a new (L, T, T) array and
    then multiplying took 32 ms and wrote 86 MB.
    """
    L, T = fused.shape[0], fused.shape[-1]
    if ranks.shape != fused.shape:
        raise ValueError(f"ranks of shape {ranks.shape} do not fit fused layers of shape {fused.shape}")
    if k < 1:
        raise ValueError(f"ranked_rollout_row discards at least one link per row, not {k}")
    r = np.float32(residual)
    halves = 2 if T >= 1024 else 1
    cuts = [j * T // halves for j in range(halves + 1)]
    rows = min(_RANKED_ROWS, T)
    scratch = [(np.empty((rows, T), dtype=bool), np.empty((rows, T), dtype=np.float32),
                np.empty(rows, dtype=np.float32)) for _ in range(halves)]
    w = np.empty(T, dtype=np.float32)

    def part(j: int, layer: int, v: np.ndarray) -> np.ndarray:
        """Σ over rows q in this thread's share of ``w_q·M_q``, filling ``w`` for those rows."""
        keep, m, s = scratch[j]
        out = np.zeros(T, dtype=np.float32)
        for r0 in range(cuts[j], cuts[j + 1], rows):
            r1 = min(cuts[j + 1], r0 + rows)
            if not v[r0:r1].any():
                w[r0:r1] = 0.0
                continue
            kb, mb, sb = keep[:r1 - r0], m[:r1 - r0], s[:r1 - r0]
            np.greater_equal(ranks[layer, r0:r1], k, out=kb)
            np.multiply(fused[layer, r0:r1], kb, out=mb)  # M: the block with its weakest links gone
            np.sum(mb, axis=-1, out=sb)
            sb *= 1 - r
            sb += r  # s_q = (1 - r)·Σ M_q + r, row q's divisor once r·e_q is mixed in
            np.divide(v[r0:r1], sb, out=w[r0:r1])
            out += w[r0:r1] @ mb
        return out

    v = np.zeros(T, dtype=np.float32)
    v[query] = 1.0
    pool = None
    try:
        if halves > 1:
            from concurrent.futures import ThreadPoolExecutor
            pool = ThreadPoolExecutor(halves, thread_name_prefix="rollout")
        for layer in range(L - 1, -1, -1):  # top layer first: v ← (1 - r)·w·M + r·w, w = v / s
            parts = (list(pool.map(lambda j: part(j, layer, v), range(halves))) if pool is not None
                     else [part(0, layer, v)])
            nxt = parts[0]
            for p in parts[1:]:
                nxt += p
            nxt *= 1 - r
            nxt += r * w
            v = nxt
    finally:
        if pool is not None:
            pool.shutdown()
    return v


def _mean_row(attention: np.ndarray, query: int, opts: RolloutOptions) -> np.ndarray:
    """:func:`rollout_row` for head-mean fusion without discarding, straight from the stored
    attention: ``v · Â_l`` is accumulated block of rows by block of rows (each block converted to
    float32 in the CPU cache), and rows where ``v`` is zero are skipped, so the top layer costs one
    row. One pass over the attention and no (L, T, T) array, where fusing first reads it and writes
    a third as much again. The same arithmetic as :func:`fused_layers` (rows renormalised)."""
    import torch

    a = torch.from_numpy(attention)
    H, T = a.shape[1], a.shape[-1]
    r = opts.residual
    rows = max(1, _CHUNK // (H * T))
    buf = torch.empty((H, rows, T), dtype=torch.float32) if a.dtype != torch.float32 else None
    v = torch.zeros(T, dtype=torch.float32)
    v[query] = 1.0
    with torch.inference_mode():
        for layer in range(a.shape[0] - 1, opts.start_layer - 1, -1):
            nxt = torch.zeros(T, dtype=torch.float32)
            for r0 in range(0, T, rows):
                r1 = min(T, r0 + rows)
                vr = v[r0:r1]
                if not bool(vr.any()):
                    continue
                blk = a[layer, :, r0:r1]
                if buf is not None:
                    blk = buf[:, :r1 - r0].copy_(blk)
                mean_rows = blk.sum(0).div_(H)  # (r, T): the head mean of these rows
                # row q of Â: ((1 - r)·m_q + r·e_q) / ((1 - r)·Σ m_q + r)
                w = vr / ((1 - r) * mean_rows.sum(-1) + r)
                nxt += (1 - r) * (w @ mean_rows)
                nxt[r0:r1] += r * w
            v = nxt
    return v.numpy()


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
