"""One forward pass that captures every attention map and token state.

timm computes attention with fused ``scaled_dot_product_attention``, where the attention matrix
never exists. While capturing, ``fused_attn`` is switched off on the captured modules only and
forward hooks on their ``attn_drop`` (which receives the softmax) record it; on the CPU, timm's
standard ``Attention`` instead gets, for the duration of the capture, a forward that computes the
softmax block of query rows by block and hands each block over as it is made. Every hook and
forward is removed in ``finally`` and ``fused_attn`` restored, also when the forward pass raises. A capture that saw
nothing raises :class:`CaptureError` rather than returning empty maps.

Captures on one model are serialised by a per-model lock, and each hook records only for the
thread that registered it, so two threads explaining at once never mix their results.
"""
from __future__ import annotations

import functools
import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from . import families
from .errors import CaptureError, ImageError
from .families import TokenLayout
from .buffers import BUFFERS as _BUFFERS
from .images import DataConfig, decode, prepare

#: Attention of one image is kept in float32 up to this many bytes, in float16 above it (values
#: lie in [0, 1], so float16 keeps them within 5e-4). ViT-B/16 at 224 (197 tokens): 22 MB,
#: float32. ViT-B/16 at 384 (577 tokens): 192 MB -> 96 MB float16. DINOv2-S/14 at 518 (1370
#: tokens, 6 heads): 540 MB -> 270 MB float16.
ATTENTION_FLOAT32_BUDGET = 64 * 2**20

_locks: "weakref.WeakKeyDictionary[nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()
#: guards every Explanation's ``cache`` dictionary (held for dictionary operations only)
_cache_guard = threading.Lock()


def model_lock(model: nn.Module) -> threading.Lock:
    """The lock that serialises captures (and hooks) on one model."""
    with _locks_guard:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.Lock()
        return lock


@dataclass
class Explanation:
    """Everything one forward pass left behind; views are computed from this, never from the model.

    Shapes: L layers, H heads, T tokens (prefix + patches), N patches, D width, C classes.
    """

    model_name: str
    family: str  # "vit" or "tnt"
    layout: TokenLayout  # prefix tokens, patch grid, patch size
    logits: np.ndarray  # (C,) float32
    probs: np.ndarray  # (C,) float32, softmax of logits
    topk: list[tuple[int, str, float]]  # (class index, label, probability), best first
    attention: np.ndarray  # (L, H, T, T), rows sum to 1; float16 above ATTENTION_FLOAT32_BUDGET
    tokens: np.ndarray  # (L + 1, T, D) float32: after the embedding (0) and after each block
    patch_embeddings: np.ndarray  # (N, D): patch tokens before position embedding and prefix
    final_tokens: np.ndarray  # (T, D) after the final norm (forward_features), which the head pools
    crop: np.ndarray  # (h, w, 3) uint8: exactly the pixels the model saw
    box: tuple[float, float, float, float]  # the crop in original-image coordinates
    image_size: tuple[int, int]  # (width, height) of the original image
    position_embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # "patch": (N, D) ...
    inner_attention: np.ndarray | None = None  # TNT: (L, N, H_in, P_in, P_in)
    notes: list[tuple[str, dict]] = field(default_factory=list)  # from decoding (first frame, ...)
    #: (L, T, T) float32: every layer's attention averaged over heads, from the float32 attention
    #: at capture (rollout's default fusion; exact even when ``attention`` is kept in float16)
    head_mean: np.ndarray | None = None
    #: (L, H) mean attention distance in input pixels, computed at capture from float32 attention
    distance: np.ndarray | None = None
    #: False for a model built without a classifier (a DINOv2 backbone): ``logits`` are then its
    #: pooled features and ``probs`` mean nothing
    classifier: bool = True
    #: derived arrays kept for repeated views (rollout's layers per head fusion, the links' ranks,
    #: row sums); never part of the results, cleared freely
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def fused(self, fusion: str) -> tuple[np.ndarray, np.ndarray]:
        """Every layer's attention fused over heads by ``fusion`` ("mean", "max", "min"), nothing
        discarded or divided, with each row's sum ``F·1`` (for any residual ``r`` rollout divides
        row q by ``(1 - r)·F_q·1 + r``): kept for the last two fusions used, so a click costs L
        vector–matrix products and a new discard ratio or start layer reads them again instead of
        fusing again. Mean fusion with the head means kept at capture needs none of this."""
        from .analysis.rollout import RolloutOptions, _check_fusion, fused_sums

        _check_fusion(fusion)  # before the cache makes room for it
        return self._cached(("fused", fusion), lambda: fused_sums(  # residual 0: the sums are F·1
            self.attention, RolloutOptions(head_fusion=fusion, residual=0.0), self.layout.num_prefix,
            head_mean=self.head_mean, nonnegative=self.nonnegative()))

    def link_ranks(self, fusion: str) -> np.ndarray:
        """:func:`explorer.analysis.rollout.link_ranks` for a head fusion, kept for the last two
        fusions used (45 MB each at 1370 tokens): built the first time a discard ratio is set,
        0.3-0.5 s there."""
        from .analysis.rollout import link_ranks

        return self._cached(("ranks", fusion), lambda: link_ranks(
            self.attention, fusion, self.layout.num_prefix, head_mean=self.head_mean, nonnegative=self.nonnegative()))

    def nonnegative(self) -> bool:
        """No attention weight is negative (a softmax's never are; checked once, 10-20 ms at
        1370 tokens, on the sign bits)."""
        def check() -> bool:
            a = torch.from_numpy(self.attention)
            bits = a.view(torch.int16 if a.dtype == torch.float16 else torch.int32)
            return bool(bits.min() >= 0) if bits.numel() else True

        return self._cached(("nonnegative",), check)

    def _cached(self, key: tuple, make: Any, keep: int = 2) -> Any:
        """``self.cache[key]``, made by ``make()`` when missing; of the entries of the same kind
        (``key[0]``) the ``keep`` used last are kept. Safe when several events of one session run
        at once (the app allows four): the dictionary is only touched under a lock, and ``make``
        runs outside it (two threads may make the same entry; both get an equal one)."""
        with _cache_guard:
            if key in self.cache:
                self.cache[key] = self.cache.pop(key)  # used last: evicted last
                return self.cache[key]
            # room first: the buffer of the entry let go is then free for make() to reuse (the
            # fused layers' pool keeps two: a third 86 MB buffer costs 30 ms of page faults)
            for old in [k for k in self.cache if k[0] == key[0]][:-(keep - 1) or None]:
                self.cache.pop(old, None)
        value = make()
        with _cache_guard:
            value = self.cache.setdefault(key, value)
            for old in [k for k in self.cache if k[0] == key[0]][:-keep]:
                self.cache.pop(old, None)
        return value

    def rollout_row(self, query: int, opts: Any) -> np.ndarray:
        """Row ``query`` of the rollout for ``opts`` (an analysis.RolloutOptions), from what the
        explanation keeps: the head means from capture (the paper's mean fusion), or the fused
        layers of :meth:`fused`; with a discard ratio, straight from those and their
        :meth:`link_ranks` (:func:`explorer.analysis.rollout.ranked_rollout_row`), so moving the
        discard slider writes no new layers and evicts no fusion."""
        from .analysis import rollout as R

        R._check(self.attention, opts, query)
        T, p = self.attention.shape[-1], self.layout.num_prefix
        k = int((T - p) * opts.discard_ratio) if opts.discard_ratio > 0 else 0
        start, r = opts.start_layer, np.float32(opts.residual)
        if opts.head_fusion == "mean" and self.head_mean is not None:
            layers = self.head_mean
            if k == 0:  # divided by the head means' row sums, kept: one product per layer
                sums = self._cached(("row_sums", "mean"), lambda: torch.from_numpy(layers).sum(-1).numpy())
        else:
            R._check_fusion(opts.head_fusion)
            layers, sums = self.fused(opts.head_fusion)
        if k == 0:
            return R._chain(layers[start:], (1 - r) * sums[start:] + r, query, opts.residual)
        return R.ranked_rollout_row(layers[start:], self.link_ranks(opts.head_fusion)[start:], k, query,
                                    opts.residual)

    def attention_distance(self) -> np.ndarray:
        """(L, H) mean attention distance: kept from capture, else computed from ``attention``."""
        if self.distance is None:
            from .analysis.distance import mean_attention_distance
            self.distance = mean_attention_distance(self.attention, self.layout)
        return self.distance

    @property
    def num_layers(self) -> int:
        return self.attention.shape[0]

    @property
    def num_heads(self) -> int:
        return self.attention.shape[1]

    @property
    def class_tokens(self) -> np.ndarray:
        """(L + 1, D) state of the class token (mean patch token without one) at every depth."""
        if self.layout.has_class_token:
            return self.tokens[:, self.layout.prefix_roles.index("cls")]
        return self.tokens[:, self.layout.num_prefix:].mean(axis=1)

    def nbytes(self) -> int:
        arrays = [self.attention, self.tokens, self.patch_embeddings, self.final_tokens, self.crop]
        arrays += [a for a in (self.head_mean, self.distance) if a is not None]
        arrays += list(self.position_embeddings.values())
        if self.inner_attention is not None:
            arrays.append(self.inner_attention)
        return int(sum(a.nbytes for a in arrays))


class _Recorder:
    """Hooks that record module outputs for one thread, and always come off again."""

    def __init__(self) -> None:
        self.owner = threading.get_ident()
        self.handles: list[Any] = []
        self.store: dict[str, list] = {}

    def on_output(self, module: nn.Module, key: str, pick=lambda out: out) -> None:
        slot = self.store.setdefault(key, [])

        def hook(_m, _args, out):
            if threading.get_ident() == self.owner:
                slot.append(pick(out))

        self.handles.append(module.register_forward_hook(hook))

    def on_input(self, module: nn.Module, key: str, pick) -> None:
        slot = self.store.setdefault(key, [])

        def hook(_m, args):
            if threading.get_ident() == self.owner:
                slot.append(pick(args))

        self.handles.append(module.register_forward_pre_hook(hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class _States:
    """Token states as the hooks see them, copied into one float32 buffer ``(B, L + 2, T, D)``: the
    embedded tokens, each block's output and the final norm's, in that order.

    Each state is copied while it is still in the CPU cache, and the forward pass's own tensor is
    let go, as in a plain forward pass; the Explanations then take views of the buffer. Keeping the
    forward's tensors and stacking them afterwards held every state twice and copied them once
    more, from memory: a batch of 32 images peaked 591 MB above the start for ViT-B and 1,798 MB
    for DINOv2-S, 277–351 and 770–835 MB now (the benchmark's explain.batch rows, two runs). The
    buffer comes from the pool: recycled once no Explanation holds it, or fresh from numpy with
    huge pages. A whole capture and Explanation took 0.98–0.99 of the time (ViT-B, DINOv2-S, TNT-S,
    one image, paired rounds), 0.986 for a batch of 8 DINOv2-S images."""

    def __init__(self, depth: int) -> None:
        self.depth = depth  # L + 2 slots
        self.buf: torch.Tensor | None = None
        self.seen = [0] * depth
        self.mismatch: str | None = None

    def put(self, slot: int, t: Any) -> bool:
        if not isinstance(t, torch.Tensor):
            self.mismatch = self.mismatch or f"a token state of type {type(t).__name__}"
            return True
        t = t.detach()
        if self.buf is None:
            shape = (t.shape[0], self.depth, *t.shape[1:])
            self.buf = (_BUFFERS.empty(shape, torch.float32) if t.device.type == "cpu"
                        else torch.empty(shape, dtype=torch.float32, device=t.device))
        target = self.buf[:, slot]
        if target.shape != t.shape:
            self.mismatch = self.mismatch or f"a token state of shape {tuple(t.shape)}, not {tuple(target.shape)}"
        elif not self.seen[slot]:
            target.copy_(t)
        self.seen[slot] += 1
        return True


@dataclass
class RawCapture:
    """Batched tensors of one capture, before they are split per image."""

    logits: torch.Tensor  # (B, C)
    attention: torch.Tensor | None  # (B, L, H, T, T) in the storage dtype; None without attention
    states: torch.Tensor  # (B, L + 1, T, D) float32: embedded tokens, then every block's output
    patch_embeddings: torch.Tensor  # (B, N, D)
    final_tokens: torch.Tensor  # (B, T, D) float32
    inner_attention: torch.Tensor | None  # TNT: (L, B * N, H_in, P, P) float32; None for ViTs
    head_mean: torch.Tensor | None = None  # (B, L, T, T) float32
    distance: torch.Tensor | None = None  # (B, L, H) float64

    @property
    def tokens(self) -> list[torch.Tensor]:
        """(L + 1) x (B, T, D): :attr:`states` depth by depth."""
        return list(self.states.unbind(1))


#: float32 values per block of query rows when attention is stored and summarised (and, on the
#: CPU, computed): small enough to stay in the CPU cache
_CHUNK = 1 << 20


@functools.lru_cache(maxsize=8)
def _distances_for(grid: tuple[int, int], patch_size: tuple[int, int]) -> torch.Tensor:
    """(P, 2, P) float32: patch-centre distances above ones, so that one batched matrix product
    over a block of attention rows gives Σ_k a_qk·d_qk and Σ_k a_qk together (kept per grid,
    never written to)."""
    from .analysis.distance import _patch_distances
    d = torch.from_numpy(_patch_distances(grid, patch_size).astype(np.float32))
    return torch.stack([d, torch.ones_like(d)], 1)


class _LayerStore:
    """Where each layer's attention goes as it is produced: the (B, L, H, T, T) buffer in the
    storage dtype, the head mean (B, L, T, T) and the mean attention distance (B, L, H).

    All three are made in one pass over the float32 attention, block of query rows by block, so
    each block is used while it is in the CPU cache: storing in float16 and summarising afterwards
    would read the whole array again, and convert it back to float32 on the way.
    """

    def __init__(self, layers: int, layout: TokenLayout | None, attention_dtype: str) -> None:
        self.layers, self.layout, self.attention_dtype = layers, layout, attention_dtype
        self.buf: torch.Tensor | None = None
        self.head_mean: torch.Tensor | None = None
        self.distance: torch.Tensor | None = None
        self.filled = 0
        self.prefix = 0
        self._scratch: dict[str, torch.Tensor] = {}

    def _allocate(self, B: int, H: int, T: int) -> None:
        dt = storage_dtype(B, self.layers, H, T, self.attention_dtype)
        self.buf = _BUFFERS.empty((B, self.layers, H, T, T), dt)
        self.head_mean = _BUFFERS.empty((B, self.layers, T, T), torch.float32)
        lay = self.layout
        self.dist = None
        if lay is not None and lay.num_tokens == T and lay.num_patches > 0:
            self.prefix = lay.num_prefix
            self.dist = _distances_for(tuple(lay.grid), tuple(lay.patch_size))
            self.distance = torch.empty((B, self.layers, H), dtype=torch.float64)
            # per patch query q and head h: [Σ_k a_qk·d_qk, Σ_k a_qk], written by the GEMM itself
            self.sums = torch.empty((B, self.layers, lay.num_patches, 2, H), dtype=torch.float32)
        self.weights = torch.full((1, H), 1.0 / H)

    def scratch(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A reusable float32 block (allocated once per capture: no fresh pages per block)."""
        n = math.prod(shape)
        t = self._scratch.get(name)
        if t is None or t.numel() < n:
            t = self._scratch[name] = torch.empty(n, dtype=torch.float32)
        return t[:n].view(shape)

    def keep_rows(self, layer: int, i0: int, r0: int, blk: torch.Tensor, stored: bool = False) -> None:
        """Store query rows ``r0 ..`` of images ``i0 ..``: ``blk`` (b, H, r, T) float32 on the CPU,
        each image's heads laid out as (H, r·T) with unit stride inside a head; ``stored``: ``blk``
        is the storage buffer's own block already."""
        assert self.buf is not None and self.head_mean is not None
        H, r1 = blk.shape[1], r0 + blk.shape[2]
        images = slice(i0, i0 + blk.shape[0])
        if not stored:
            self.buf[images, layer, :, r0:r1].copy_(blk)
        weights = self.weights
        means = self.head_mean[images, layer, r0:r1]
        p = self.prefix
        q0 = max(r0, p)
        for j in range(blk.shape[0]):
            # the head mean as a (1, H)·(H, r·T) product: no zero-fill and no second pass to divide
            torch.mm(weights, blk[j].reshape(H, -1), out=means[j].view(1, -1))
            if self.dist is not None and q0 < r1:
                # patch queries to patch keys, per query row q: [Σ_k a_qk·d_qk, Σ_k a_qk] for every
                # head, renormalised over patch keys later (summed: 1 - prefix share would lose
                # every digit when prefix tokens take nearly all the attention, as sinks do)
                # (q, 2, k)·(q, k, H): the GEMM layout MKL does fastest here (1.7x the (q, H, k)·(q, k, 2))
                torch.bmm(self.dist[q0 - p:r1 - p], blk[j, :, q0 - r0:, p:].permute(1, 2, 0),
                          out=self.sums[i0 + j, layer, q0 - p:r1 - p])

    def finish_layer(self, layer: int, H: int) -> None:
        self.filled += 1
        if self.distance is not None and self.filled == self.layers:  # every layer at once: few small ops
            self.distance.copy_((self.sums[..., 0, :] / self.sums[..., 1, :].clamp_min(1e-12)).mean(2))

    def keep(self, layer: int, a: torch.Tensor) -> None:
        """Store layer ``layer``'s attention ``a`` (B, H, T, T), rows summing to 1 (from a hook)."""
        a = a.detach()
        if a.device.type != "cpu" or a.dtype != torch.float32:
            a = a.to("cpu", torch.float32)
        B, H, T = a.shape[0], a.shape[1], a.shape[-1]
        if self.buf is None:
            self._allocate(B, H, T)
        rows = max(1, _CHUNK // (B * H * T))  # every image at once: few, larger blocks
        for r0 in range(0, T, rows):
            self.keep_rows(layer, 0, r0, a[:, :, r0:r0 + rows])
        self.finish_layer(layer, H)

    def attend(self, layer: int, q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """``softmax(scale·q·kᵀ)·v`` block of query rows by block, storing each block of attention
        on the way: the (T, T) scores never exist whole. q (B, H, T, d), kt (B, H, d, T),
        v (B, H, T, d); returns (B, T, H, d), the layout the projection wants next.

        With float32 storage the scores are computed in the storage buffer itself (no copy: a
        batch of 32 ViT-B images stores 0.7 GB); with float16 they go through a cached block."""
        B, H, T, hd = q.shape
        if self.buf is None:
            self._allocate(B, H, T)
        assert self.buf is not None
        out = torch.empty((B, T, H, v.shape[-1]), dtype=q.dtype)
        rows = max(1, _CHUNK // (H * T))  # one image at a time (the matmuls want whole heads)
        for i in range(B):
            qi, kti, vi = q[i], kt[i], v[i]
            if rows < T:  # several blocks reuse kᵀ and v: worth the faster GEMM layouts (1370 tokens: 5 %)
                qi, kti, vi = qi.contiguous(), kti.contiguous(), vi.contiguous()  # (one block: 7 % slower)
            for r0 in range(0, T, rows):
                r1 = min(T, r0 + rows)
                probs = self.buf[i, layer, :, r0:r1]
                stored = probs.dtype == torch.float32 and probs.is_contiguous()
                if not stored:
                    probs = self.scratch("scores", (H, r1 - r0, T))
                torch.baddbmm(probs, qi[:, r0:r1], kti, beta=0.0, alpha=scale, out=probs)
                torch.ops.aten._softmax.out(probs, -1, False, out=probs)  # in place: one block in cache
                self.keep_rows(layer, i, r0, probs.unsqueeze(0), stored=stored)
                pv = torch.bmm(probs, vi, out=self.scratch("out", (H, r1 - r0, vi.shape[-1])))
                out[i, r0:r1].copy_(pv.transpose(0, 1))
        self.finish_layer(layer, H)
        return out


def _blockable(mod: nn.Module) -> str | None:
    """Which reproduced forward fits ``mod``: ``"vit"`` for timm's standard ``Attention`` (ViT,
    DeiT, DINOv2, registers), ``"tnt"`` for TNT's ``Attention`` (inner and outer); None for other
    classes, which keep the hook path."""
    try:
        from timm.layers.attention import Attention
        from timm.models.tnt import Attention as TntAttention
    except ImportError:  # pragma: no cover - old timm
        return None
    if "forward" in mod.__dict__:
        return None  # never replace a forward someone else installed
    if type(mod) is Attention and all(hasattr(mod, n) for n in (
            "qkv", "q_norm", "k_norm", "norm", "proj", "proj_drop", "num_heads", "head_dim", "scale", "attn_dim")):
        return "vit"
    if type(mod) is TntAttention and all(hasattr(mod, n) for n in (
            "qk", "v", "proj", "proj_drop", "num_heads", "head_dim", "scale")):
        return "tnt"
    return None


def _autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # pragma: no cover - torch before 2.4
        return torch.is_autocast_cpu_enabled()


def _qkv(mod: nn.Module, kind: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, N, d) exactly as the module's own forward makes them."""
    B, N, _ = x.shape
    if kind == "tnt":
        qk = mod.qk(x).reshape(B, N, 2, mod.num_heads, mod.head_dim).permute(2, 0, 3, 1, 4)
        q, k = qk.unbind(0)
        return q, k, mod.v(x).reshape(B, N, mod.num_heads, -1).permute(0, 2, 1, 3)
    qkv = mod.qkv(x).reshape(B, N, 3, mod.num_heads, mod.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return mod.q_norm(q), mod.k_norm(k), v


def _blocked_forward(mod: nn.Module, kind: str, owner: int, attend):
    """The forward of timm's ``Attention`` (``kind`` "vit") or TNT's (``kind`` "tnt") with the
    softmax computed by ``attend(q, kᵀ, v, scale) -> (B, N, H, d_v)``, which stores the attention
    on the way (same arithmetic, checked by the tests against timm's own path). Other threads,
    masks, training and non-CPU tensors take the class's own forward (unfused while capturing: the
    hooks record)."""
    own = type(mod).forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any):
        if (args or any(v is not None and v is not False for v in kwargs.values())
                or threading.get_ident() != owner or mod.training or x.device.type != "cpu"
                or x.dtype != torch.float32 or _autocast()):
            return own(mod, x, *args, **kwargs)  # masks, other threads ...: the class's own path
        B, N, _ = x.shape
        gate = mod.gate(x).sigmoid() if getattr(mod, "gate", None) is not None else None
        q, k, v = _qkv(mod, kind, x)
        x = attend(q, k.transpose(-2, -1), v, mod.scale).reshape(B, N, -1)
        if kind == "vit":
            x = mod.norm(x)
        if gate is not None:
            x = x * gate
        return mod.proj_drop(mod.proj(x))

    return forward


class _InnerStore:
    """TNT's inner attention, (L, B·N, H_in, P, P) float32, written by the softmax itself: every
    patch's few pixel tokens at once, as timm computes them, but into the kept buffer."""

    def __init__(self, layers: int) -> None:
        self.layers, self.buf, self.filled = layers, None, 0

    def attend(self, layer: int, q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        n, H, P, hd = q.shape
        if self.buf is None:
            self.buf = _BUFFERS.empty((self.layers, n, H, P, P), torch.float32)
        a = self.buf[layer].view(n * H, P, P)
        torch.baddbmm(a, q.reshape(n * H, P, hd), kt.reshape(n * H, hd, P), beta=0.0, alpha=scale, out=a)
        torch.ops.aten._softmax.out(a, -1, False, out=a)
        self.filled += 1
        return torch.bmm(a, v.reshape(n * H, P, -1)).view(n, H, P, -1).transpose(1, 2)


def storage_dtype(batch: int, layers: int, heads: int, tokens: int, attention_dtype: str = "auto") -> torch.dtype:
    """float32 within :data:`ATTENTION_FLOAT32_BUDGET` per image, else float16."""
    if attention_dtype == "float16":
        return torch.float16
    if attention_dtype == "float32":
        return torch.float32
    return torch.float16 if layers * heads * tokens * tokens * 4 > ATTENTION_FLOAT32_BUDGET else torch.float32


def capture(model: nn.Module, x: torch.Tensor, *, attention: bool = True,
            attention_dtype: str = "auto", blocked: bool = True) -> RawCapture:
    """Run ``model`` once on a normalised batch ``x`` and record attention and token states.

    Each layer's attention goes, as it is produced, into one preallocated CPU buffer
    ``(B, L, H, T, T)`` of the storage dtype, with its head mean and mean attention distance made
    on the way (:class:`_LayerStore`). On the CPU, timm's standard ``Attention`` is computed block
    of query rows by block (:func:`_blocked_forward`), so a layer's (T, T) float32 scores never
    exist whole; other attention modules run their own unfused path under a hook.

    Args:
        model: a ViT-family or TNT timm model in eval mode.
        x: ``(B, 3, H, W)`` input (moved to the model's device).
        attention: False records token states only (fused attention stays on: the fast path for
            embedding many images).
        attention_dtype: see :func:`storage_dtype`.
        blocked: compute timm ``Attention`` block of query rows by block (on the CPU), storing
            each block as it is made; False: timm's own unfused path and a hook for every layer.

    Raises:
        CaptureError: the forward pass failed, or the hooks recorded nothing.
    """
    fam = families.family_of(model)
    attn_mods = families.attention_modules(model) if attention else []
    inner_mods = families.inner_attention_modules(model) if attention else []
    rec = _Recorder()
    try:
        layout = families.layout_for(model, (int(x.shape[-2]), int(x.shape[-1])))
    except Exception:  # an input the layout cannot describe: the capture itself will say what is wrong
        layout = None
    store = _LayerStore(len(attn_mods), layout, attention_dtype)
    n_blocks = len(model.blocks)
    states = _States(n_blocks + 2)
    inner_store = _InnerStore(len(inner_mods))
    patched: list[nn.Module] = []

    def patch(m: nn.Module, attend) -> None:
        kind = _blockable(m) if blocked else None
        if kind is not None:
            m.forward = _blocked_forward(m, kind, rec.owner, attend)
            patched.append(m)

    def keep_attention(layer: int):
        def pick(out: torch.Tensor) -> None:
            store.keep(layer, out)
        return pick

    device = next(model.parameters()).device
    x = x.to(device)
    with model_lock(model):
        fused_before = [getattr(m, "fused_attn", None) for m in attn_mods]
        try:
            for i, m in enumerate(attn_mods):
                if hasattr(m, "fused_attn"):
                    m.fused_attn = False
                rec.on_output(m.attn_drop, f"attention{i}", keep_attention(i))
                patch(m, functools.partial(store.attend, i))
            for i, m in enumerate(inner_mods):
                rec.on_output(m.attn_drop, "inner")
                patch(m, functools.partial(inner_store.attend, i))
            # TNT's blocks take and give (pixel tokens, patch tokens): its states are the patch tokens
            state = 1 if fam == "tnt" else 0
            rec.on_input(model.blocks[0], "embedded", lambda a: states.put(0, a[state]))
            for i, blk in enumerate(model.blocks):
                rec.on_output(blk, "blocks", lambda out, slot=i + 1: states.put(slot, out[state] if state else out))
            rec.on_output(model.norm, "final", lambda out: states.put(n_blocks + 1, out))
            if fam == "tnt":
                rec.on_output(model.norm2_proj, "patch_embeddings")
            else:
                rec.on_output(model.patch_embed, "patch_embeddings",
                              lambda out: out.flatten(1, 2) if out.ndim == 4 else out)
            try:
                with torch.inference_mode():
                    logits = model(x)
            except Exception as err:
                raise CaptureError(
                    f"The model's forward pass failed on an input of shape {tuple(x.shape)}: "
                    f"{type(err).__name__}: {str(err)[:300]}",
                    code="forward_failed", shape=str(tuple(x.shape))) from err
        finally:
            rec.remove()
            for m in patched:
                m.__dict__.pop("forward", None)  # back to the class's forward
            for m, before in zip(attn_mods, fused_before):
                if before is not None:
                    m.fused_attn = before
    s = rec.store
    if attention and store.filled != n_blocks:
        raise CaptureError(
            f"Captured attention from {store.filled} of {n_blocks} blocks: this model's "
            "attention modules did not run the unfused path the hooks observe.", code="nothing_captured")
    if len(s.get("blocks", [])) != n_blocks or not s.get("embedded") or not s.get("final"):
        raise CaptureError("The hooks saw no token states: the model's forward path is not the one "
                           "this family spec expects.", code="nothing_captured")
    if states.mismatch or max(states.seen) > 1:
        raise CaptureError(f"The hooks saw {states.mismatch or 'a block run twice'} in one forward pass: this "
                           "model's blocks do not keep one sequence of tokens.", code="nothing_captured")
    cpu = torch.device("cpu")
    inner = None
    if inner_store.filled == len(inner_mods) > 0:
        inner = inner_store.buf
    elif inner_mods and len(s.get("inner", [])) == len(inner_mods):  # the hook path
        inner = torch.stack([t.to(cpu) for t in s["inner"]], 0)
    elif attention and inner_mods:
        raise CaptureError(f"Captured inner attention from {inner_store.filled or len(s.get('inner', []))} of "
                           f"{len(inner_mods)} blocks.", code="nothing_captured")
    return RawCapture(
        logits=logits.to(cpu),
        attention=store.buf,
        states=states.buf[:, :n_blocks + 1].to(cpu),
        patch_embeddings=s["patch_embeddings"][0].to(cpu),
        final_tokens=states.buf[:, n_blocks + 1].to(cpu),
        inner_attention=inner,
        head_mean=store.head_mean,
        distance=store.distance,
    )


def label_names_for(model: Any, num_classes: int) -> list[str]:
    names = getattr(model, "label_names", None)
    if names and len(names) == num_classes:
        return list(names)
    cfg = getattr(getattr(model, "model", model), "pretrained_cfg", None) or {}
    names = cfg.get("label_names")
    if names and len(names) == num_classes:
        return list(names)
    if num_classes in (1000, 11821, 21841, 21843):
        try:
            from timm.data import ImageNetInfo
            info = ImageNetInfo(f"imagenet-{'1k' if num_classes == 1000 else '22k'}")
            if info.num_classes() == num_classes:
                return [info.index_to_description(i).split(",")[0] for i in range(num_classes)]
        except Exception:  # label files missing from an unusual timm install: fall back to numbers
            pass
    return [f"class {i}" for i in range(num_classes)]


def _unwrap(model: Any) -> tuple[nn.Module, str]:
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        return inner, getattr(model, "name", type(inner).__name__)
    if isinstance(model, nn.Module):
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return model, cfg.get("architecture") or type(model).__name__
    raise TypeError(f"expected a model from explorer.load_model or a timm nn.Module, got {type(model)!r}")


def explain(model: Any, image: Any, *, topk: int = 5, input_size: tuple[int, int] | None = None,
            attention_dtype: str = "auto") -> Explanation:
    """Explain one image: one forward pass, everything the views need.

    Args:
        model: what :func:`explorer.load_model` returned, or a timm ViT/DeiT/TNT module.
        image: a path, bytes, PIL image or RGB array.
        topk: how many predictions to keep.
        input_size: ``(height, width)`` to run at, for models built with ``dynamic_img_size``
            (non-square inputs among them); default the model's own size.
        attention_dtype: ``"auto"`` (float32 within :data:`ATTENTION_FLOAT32_BUDGET`, else
            float16), ``"float32"`` or ``"float16"``.

    Returns:
        An :class:`Explanation`.
    """
    return explain_batch(model, [image], topk=topk, input_size=input_size,
                         attention_dtype=attention_dtype)[0]


@dataclass
class Batch:
    """Decoded, cropped and normalised images, ready for one forward pass."""

    net: nn.Module
    name: str
    config: DataConfig
    decoded: list  # DecodedImage per image
    prepared: list  # Prepared per image
    x: torch.Tensor  # (B, 3, H, W)


def prepare_batch(model: Any, images: Sequence[Any], input_size: tuple[int, int] | None = None) -> Batch:
    """Decode and preprocess images exactly as :func:`explain_batch` does."""
    net, name = _unwrap(model)
    cfg = getattr(model, "data_config", None) or DataConfig.from_model(net, families.default_input_size(net))
    if input_size is not None and tuple(input_size) != tuple(cfg.input_size):
        if not families.supports_dynamic_size(net):
            raise ImageError(
                f"{name} only accepts {cfg.input_size[1]}×{cfg.input_size[0]} inputs; it was not built "
                "with dynamic_img_size=True.", code="fixed_input_size")
        cfg = DataConfig(tuple(input_size), cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)
    ps = families.patch_size(net)
    decoded = [decode(im) for im in images]
    prepared = [prepare(d.array, cfg, min_patch=max(ps)) for d in decoded]
    return Batch(net, name, cfg, decoded, prepared, torch.cat([p.tensor for p in prepared]))


def build_explanations(model: Any, batch: Batch, raw: RawCapture, topk: int = 5) -> list[Explanation]:
    """Split one batched capture into an :class:`Explanation` per image."""
    net = batch.net
    layout = families.layout_for(net, batch.config.input_size)
    logits = raw.logits.float()
    probs = logits.softmax(-1)
    names = label_names_for(model, logits.shape[-1])
    # a model built without a classifier head (num_classes=0: DINOv2 backbones) returns its pooled
    # features as "logits"; a softmax over them is no prediction, so none is reported
    classifier = not families.is_backbone(net)
    k = min(topk, logits.shape[-1]) if classifier else 0
    top_p, top_i = probs.topk(k, dim=-1)
    attn = raw.attention  # (B, L, H, T, T), already in the storage dtype
    if attn is None or attn.shape[-1] != layout.num_tokens:
        raise CaptureError(f"captured {None if attn is None else attn.shape[-1]} tokens, layout expects "
                           f"{layout.num_tokens}", code="layout")
    attn_np = attn.numpy()
    tokens = raw.states.numpy()  # (B, L + 1, T, D)
    inner = None
    if raw.inner_attention is not None:
        b, n = batch.x.shape[0], layout.num_patches
        inner_t = raw.inner_attention  # (L, B * N, H_in, P, P)
        inner = inner_t.reshape(inner_t.shape[0], b, n, *inner_t.shape[2:]).transpose(0, 1).float().numpy()
    pos = {k2: v.float().cpu().numpy() for k2, v in families.position_embeddings(net).items()}
    family = families.family_of(net)
    return [Explanation(
        model_name=batch.name, family=family, layout=layout, logits=logits[i].numpy(), probs=probs[i].numpy(),
        topk=[(int(c), names[int(c)], float(pr)) for pr, c in zip(top_p[i], top_i[i])],
        attention=attn_np[i], tokens=tokens[i], patch_embeddings=raw.patch_embeddings[i].float().numpy(),
        final_tokens=raw.final_tokens[i].numpy(), crop=p.crop, box=p.box, image_size=d.size,
        position_embeddings=pos, inner_attention=None if inner is None else inner[i], notes=d.notes,
        head_mean=None if raw.head_mean is None else raw.head_mean[i].numpy(),
        distance=None if raw.distance is None else raw.distance[i].numpy(), classifier=classifier)
        for i, (d, p) in enumerate(zip(batch.decoded, batch.prepared))]


def explain_batch(model: Any, images: Sequence[Any], *, topk: int = 5,
                  input_size: tuple[int, int] | None = None,
                  attention_dtype: str = "auto") -> list[Explanation]:
    """:func:`explain` for several images in one batched forward pass."""
    batch = prepare_batch(model, images, input_size)
    raw = capture(batch.net, batch.x, attention_dtype=attention_dtype)
    return build_explanations(model, batch, raw, topk)
