"""What :mod:`explorer.bench` times: our code paths, and what a user would write by hand instead.

Ours: :func:`explorer.capture.capture` + the Explanation built exactly as
:func:`explorer.capture.explain_batch` builds it, the analyses, the renderers and the app's view
functions. Theirs: a plain fused forward pass; hooks on ``attn_drop`` with fused attention switched
off on the whole model and the full rollout matrix chain (as in jacobgil/vit-explain); timm's
``AttentionExtract`` (fx) with the same chain. Every side runs under ``torch.inference_mode``.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from . import analysis, families
from .analysis import posembed
from .capture import Batch, Explanation, build_explanations, capture, prepare_batch
from .render import overlay


# ----------------------------------------------------------------------------- inputs

def synthetic_photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 photo-sized image: smooth gradients plus noise (decodes and resizes like a photo)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin((xx + yy) / 97.0)], -1) * 200
    noise = rng.integers(0, 56, size=(height, width, 3), dtype=np.uint8)
    return (base.astype(np.uint8) + noise).astype(np.uint8)


def prepared_batch(loaded: Any, images: Sequence[np.ndarray], device: torch.device
                   ) -> tuple[torch.Tensor, Batch, list[tuple[int, int]]]:
    """Decode and preprocess with the engine's own :func:`explorer.capture.prepare_batch`; the
    tensor moved to ``device``."""
    batch = prepare_batch(loaded, images)
    return batch.x.to(device), batch, [d.size for d in batch.decoded]


# ----------------------------------------------------------------------------- ours

def plain_forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return net(x)


def fused_flags(net: nn.Module) -> list[bool | None]:
    return [getattr(m, "fused_attn", None) for m in families.attention_modules(net)]


def ours_explain(loaded: Any, x: torch.Tensor, batch: Batch, sizes: Sequence[tuple[int, int]],
                 attention_dtype: str = "auto") -> list[Explanation]:
    """Capture (one forward pass: logits, attention, token states) and build the Explanations,
    with the engine's own functions (what :func:`explorer.explain_batch` runs after decoding)."""
    return build_explanations(loaded, batch, capture(loaded.model, x, attention_dtype=attention_dtype))


def ours_rollout_map(loaded: Any, x: torch.Tensor, batch: Batch, sizes) -> np.ndarray:
    """Our pipeline for "the class-token rollout map of one image"."""
    exp = ours_explain(loaded, x, batch, sizes)[0]
    lay = exp.layout
    row = exp.rollout_row(lay.default_query(), analysis.RolloutOptions())
    return analysis.patch_map(row, lay.num_prefix, lay.grid)


# ----------------------------------------------------------------------------- theirs

def unfused_copy(net: nn.Module) -> nn.Module:
    """The model as a user would set it up: fused attention off everywhere (like
    ``timm.layers.set_fused_attn(False)`` before building), same weights."""
    other = copy.deepcopy(net).eval()
    for m in other.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return other


class HandHooks:
    """Forward hooks on every block's ``attn_drop``, fused attention off for good."""

    def __init__(self, net: nn.Module) -> None:
        self.net = unfused_copy(net)
        self.maps: list[torch.Tensor] = []
        blocks = self.net.blocks
        mods = [b.attn_out if hasattr(b, "attn_out") else b.attn for b in blocks]
        self.handles = [m.attn_drop.register_forward_hook(lambda _m, _i, out: self.maps.append(out))
                        for m in mods]

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, attention (B, L, H, T, T))."""
        self.maps.clear()
        with torch.inference_mode():
            logits = self.net(x)
            attn = torch.stack(self.maps, 1)
        self.maps.clear()
        return logits, attn

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class TimmExtract:
    """``timm.utils.AttentionExtract`` (fx graph of the softmax nodes), fused attention off.

    ``with_logits``: also return the ``head`` node, so that one pass gives the prediction as well
    (the default node list returns attention only, and its graph stops at the last softmax).
    """

    def __init__(self, net: nn.Module, with_logits: bool = True) -> None:
        from timm.utils import AttentionExtract

        names = ["*attn_out.softmax"] if families.family_of(net) == "tnt" else ["*attn.softmax"]
        self.with_logits = with_logits
        self.ex = AttentionExtract(unfused_copy(net), names=names + (["head"] if with_logits else []),
                                   method="fx")

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(logits or None, attention (B, L, H, T, T))."""
        with torch.inference_mode():
            out = self.ex(x)
            logits = out.pop("head", None)
            return logits, torch.stack(list(out.values()), 1)


def torch_rollout_full(attn: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """The full rollout matrix chain as users write it (jacobgil/vit-explain). (L, H, T, T) -> (T, T)."""
    with torch.inference_mode():
        t = attn.shape[-1]
        eye = torch.eye(t, dtype=torch.float32, device=attn.device)
        result = eye.clone()
        for a in attn:
            f = (1 - residual) * a.float().mean(0) + residual * eye
            f = f / f.sum(-1, keepdim=True)
            result = f @ result
        return result


def their_rollout_map(attn: torch.Tensor, layout: families.TokenLayout) -> np.ndarray:
    """Class-token row of the full chain over the patch grid, normalised (what users plot)."""
    q, p = layout.default_query(), layout.num_prefix
    row = torch_rollout_full(attn[0])[q, p:]
    m = (row / row.sum()).reshape(layout.grid)
    return m.cpu().numpy()


# ----------------------------------------------------------------------------- views

def views_computed(exp: Explanation, photo: np.ndarray, parts: dict[str, list[float]] | None = None
                   ) -> dict[str, Any]:
    """Every view of one image from its Explanation: the arrays and the 12-MP overlays.

    Class-token rollout, the layer × head grid of raw maps (and its tiled image), mean attention
    distance, position-embedding similarity tiles, TNT inner attention, and two overlays at the
    photo's own size (the rollout, and the last layer's head-mean map). ``parts`` collects the
    seconds of each step.
    """
    out: dict[str, Any] = {}
    lay = exp.layout
    q = lay.default_query()
    t = time.perf_counter()

    def lap(key: str) -> None:
        nonlocal t
        now = time.perf_counter()
        if parts is not None:
            parts.setdefault(key, []).append(now - t)
        t = now

    row = exp.rollout_row(q, analysis.RolloutOptions())
    out["rollout"] = analysis.patch_map(row, lay.num_prefix, lay.grid)
    lap("rollout")
    out["maps"] = analysis.query_maps(exp.attention, q, lay)  # (L, H, rows, cols)
    out["grid_image"] = overlay.tile_maps(out["maps"])
    lap("layer×head")
    out["distance"] = exp.attention_distance()
    lap("distance")
    pos = exp.position_embeddings.get("patch")
    if pos is not None:
        out["pos"] = posembed.similarity_tiles(pos, lay.grid if pos.shape[0] == lay.num_patches
                                               else _pos_grid(pos.shape[0]))
    lap("pos-embed")
    if exp.inner_attention is not None:
        out["inner"] = analysis.inner_map(exp.inner_attention, lay.num_patches // 2, exp.num_layers - 1,
                                          patch_size=tuple(lay.patch_size))
    out["overlay_rollout"], out["overlay_layer"] = overlay.overlays(
        photo, [out["rollout"], out["maps"][-1].mean(0)], box=exp.box)
    lap("overlays")
    return out


def _pos_grid(n: int) -> tuple[int, int]:
    side = int(round(n ** 0.5))
    return (side, n // side)


def views_app(s: Any, loaded: Any, lang: str = "en", parts: dict[str, list[float]] | None = None) -> list[Any]:
    """Every view function the app calls after an explanation (explorer/app/main.py ``everything``),
    Plotly figures included. ``parts`` collects the seconds of each function."""
    from .app import handlers as H
    from .app import views

    ps = loaded.facts.patch_size[0]
    calls = [("attention", lambda: app_attention(s, lang)),
             ("patches", lambda: views.patches_view(s, lang, ps, ps)),
             ("posembed", lambda: views.posembed_view(s, lang, loaded.facts.grid)),
             ("distance", lambda: views.distance_view(s, lang)),
             ("text", lambda: (H.prediction(s, lang, loaded), H.notes_text(s, lang)))]
    out = []
    for key, fn in calls:
        t = time.perf_counter()
        out.append(fn())
        if parts is not None:
            parts.setdefault(key, []).append(time.perf_counter() - t)
    return out


def app_attention(s: Any, lang: str = "en", fusion: str = "mean", discard: float = 0.0, start: int = 0,
                  opacity: float = 0.55, show_mask: bool = True, inner_layer: int = 0, grid: bool = False) -> dict:
    """What the app computes for one event (explorer/app/views.py ``attention_tab``): sliders leave
    the layer × head grid as it is (``grid=False``), a click or a new query rebuilds it."""
    from .app import views

    return views.attention_tab(s, lang, fusion=fusion, discard=discard, start_layer=start, opacity=opacity,
                               show_mask=show_mask, inner_layer=inner_layer, grid=grid)


class ForwardCounter:
    """Counts calls of a model's forward (a pre-hook), to prove that views run no forward pass."""

    def __init__(self, net: nn.Module) -> None:
        self.calls = 0
        self.handle = net.register_forward_pre_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.calls += 1

    def close(self) -> None:
        self.handle.remove()
