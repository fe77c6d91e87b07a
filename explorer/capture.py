"""One forward pass that captures every attention map and token state.

timm computes attention with fused ``scaled_dot_product_attention``, where the attention matrix
never exists. While capturing, ``fused_attn`` is switched off on the captured modules only and
forward hooks on their ``attn_drop`` (which receives the softmax) record it; every hook is removed
in ``finally`` and ``fused_attn`` restored, also when the forward pass raises. A capture that saw
nothing raises :class:`CaptureError` rather than returning empty maps.

Captures on one model are serialised by a per-model lock, and each hook records only for the
thread that registered it, so two threads explaining at once never mix their results.
"""
from __future__ import annotations

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
from .images import DataConfig, decode, prepare

#: Attention of one image is kept in float32 up to this many bytes, in float16 above it (values
#: lie in [0, 1], so float16 keeps them within 5e-4). ViT-B/16 at 224 (197 tokens): 22 MB,
#: float32. ViT-B/16 at 384 (577 tokens): 192 MB -> 96 MB float16. DINOv2-S/14 at 518 (1370
#: tokens, 6 heads): 540 MB -> 270 MB float16.
ATTENTION_FLOAT32_BUDGET = 64 * 2**20

_locks: "weakref.WeakKeyDictionary[nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


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
    final_tokens: np.ndarray  # (T, D) after the final norm: what the head reads
    crop: np.ndarray  # (h, w, 3) uint8: exactly the pixels the model saw
    box: tuple[float, float, float, float]  # the crop in original-image coordinates
    image_size: tuple[int, int]  # (width, height) of the original image
    position_embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # "patch": (N, D) ...
    inner_attention: np.ndarray | None = None  # TNT: (L, N, H_in, P_in, P_in)
    notes: list[tuple[str, dict]] = field(default_factory=list)  # from decoding (first frame, ...)
    #: derived arrays kept for repeated views (fused rollout layers per setting); never part of
    #: the results, cleared freely
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def fused(self, opts: Any) -> np.ndarray:
        """Rollout's fused layers ``Â`` for ``opts`` (an analysis.RolloutOptions), kept for the last
        few settings so a slider or a click costs L vector–matrix products, not a re-fusion."""
        from .analysis.rollout import fused_layers

        key = ("fused", opts)
        if key not in self.cache:
            for old in [k for k in self.cache if k[0] == "fused"][:-1]:  # keep at most two settings
                del self.cache[old]
            self.cache[key] = fused_layers(self.attention, opts, self.layout.num_prefix)
        return self.cache[key]

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


@dataclass
class RawCapture:
    """Batched tensors of one capture, before they are split per image."""

    logits: torch.Tensor  # (B, C)
    attention: torch.Tensor | None  # (B, L, H, T, T) in the storage dtype; None without attention
    tokens: list[torch.Tensor]  # (L + 1) x (B, T, D)
    patch_embeddings: torch.Tensor  # (B, N, D)
    final_tokens: torch.Tensor  # (B, T, D)
    inner_attention: list[torch.Tensor]  # TNT: L x (B * N, H_in, P, P)


def storage_dtype(batch: int, layers: int, heads: int, tokens: int, attention_dtype: str = "auto") -> torch.dtype:
    """float32 within :data:`ATTENTION_FLOAT32_BUDGET` per image, else float16."""
    if attention_dtype == "float16":
        return torch.float16
    if attention_dtype == "float32":
        return torch.float32
    return torch.float16 if layers * heads * tokens * tokens * 4 > ATTENTION_FLOAT32_BUDGET else torch.float32


def capture(model: nn.Module, x: torch.Tensor, *, attention: bool = True,
            attention_dtype: str = "auto") -> RawCapture:
    """Run ``model`` once on a normalised batch ``x`` and record attention and token states.

    Each layer's attention is copied, as it is produced, into one preallocated CPU buffer
    ``(B, L, H, T, T)`` of the storage dtype: no per-layer list, no stacking copy, so the peak is
    the buffer plus one layer.

    Args:
        model: a ViT-family or TNT timm model in eval mode.
        x: ``(B, 3, H, W)`` input (moved to the model's device).
        attention: False records token states only (fused attention stays on: the fast path for
            embedding many images).
        attention_dtype: see :func:`storage_dtype`.

    Raises:
        CaptureError: the forward pass failed, or the hooks recorded nothing.
    """
    fam = families.family_of(model)
    attn_mods = families.attention_modules(model) if attention else []
    inner_mods = families.inner_attention_modules(model) if attention else []
    rec = _Recorder()
    n_layers = len(attn_mods)
    buf: list[torch.Tensor] = []  # the (B, L, H, T, T) buffer, allocated at the first layer
    filled = [0]

    def keep_attention(layer: int):
        def pick(out: torch.Tensor) -> None:
            if not buf:
                dt = storage_dtype(out.shape[0], n_layers, out.shape[1], out.shape[-1], attention_dtype)
                buf.append(torch.empty((out.shape[0], n_layers, *out.shape[1:]), dtype=dt))
            buf[0][:, layer].copy_(out)  # casts and moves to the CPU in one step
            filled[0] += 1
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
            for m in inner_mods:
                rec.on_output(m.attn_drop, "inner")
            if fam == "tnt":
                rec.on_input(model.blocks[0], "embedded", lambda a: a[1])
                rec.on_output(model.norm2_proj, "patch_embeddings")
                for blk in model.blocks:
                    rec.on_output(blk, "blocks", lambda out: out[1])
            else:
                rec.on_input(model.blocks[0], "embedded", lambda a: a[0])
                rec.on_output(model.patch_embed, "patch_embeddings",
                              lambda out: out.flatten(1, 2) if out.ndim == 4 else out)
                for blk in model.blocks:
                    rec.on_output(blk, "blocks")
            rec.on_output(model.norm, "final")
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
            for m, before in zip(attn_mods, fused_before):
                if before is not None:
                    m.fused_attn = before
    s = rec.store
    n_blocks = len(model.blocks)
    if attention and filled[0] != n_blocks:
        raise CaptureError(
            f"Captured attention from {filled[0]} of {n_blocks} blocks: this model's "
            "attention modules did not run the unfused path the hooks observe.", code="nothing_captured")
    if len(s.get("blocks", [])) != n_blocks or not s.get("embedded"):
        raise CaptureError("The hooks saw no token states: the model's forward path is not the one "
                           "this family spec expects.", code="nothing_captured")
    cpu = torch.device("cpu")
    return RawCapture(
        logits=logits.to(cpu),
        attention=buf[0] if buf else None,
        tokens=[t.to(cpu) for t in s["embedded"] + s["blocks"]],
        patch_embeddings=s["patch_embeddings"][0].to(cpu),
        final_tokens=s["final"][0].to(cpu),
        inner_attention=[t.to(cpu) for t in s.get("inner", [])],
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
    k = min(topk, logits.shape[-1])
    top_p, top_i = probs.topk(k, dim=-1)
    attn = raw.attention  # (B, L, H, T, T), already in the storage dtype
    if attn is None or attn.shape[-1] != layout.num_tokens:
        raise CaptureError(f"captured {None if attn is None else attn.shape[-1]} tokens, layout expects "
                           f"{layout.num_tokens}", code="layout")
    attn_np = attn.numpy()
    tokens = torch.stack(raw.tokens, 1).float().numpy()  # (B, L + 1, T, D)
    inner = None
    if raw.inner_attention:
        b, n = batch.x.shape[0], layout.num_patches
        inner_t = torch.stack(raw.inner_attention, 0)  # (L, B * N, H_in, P, P)
        inner = inner_t.reshape(inner_t.shape[0], b, n, *inner_t.shape[2:]).transpose(0, 1).float().numpy()
    pos = {k2: v.float().cpu().numpy() for k2, v in families.position_embeddings(net).items()}
    family = families.family_of(net)
    return [Explanation(
        model_name=batch.name, family=family, layout=layout, logits=logits[i].numpy(), probs=probs[i].numpy(),
        topk=[(int(c), names[int(c)], float(pr)) for pr, c in zip(top_p[i], top_i[i])],
        attention=attn_np[i], tokens=tokens[i], patch_embeddings=raw.patch_embeddings[i].float().numpy(),
        final_tokens=raw.final_tokens[i].float().numpy(), crop=p.crop, box=p.box, image_size=d.size,
        position_embeddings=pos, inner_attention=None if inner is None else inner[i], notes=d.notes)
        for i, (d, p) in enumerate(zip(batch.decoded, batch.prepared))]


def explain_batch(model: Any, images: Sequence[Any], *, topk: int = 5,
                  input_size: tuple[int, int] | None = None,
                  attention_dtype: str = "auto") -> list[Explanation]:
    """:func:`explain` for several images in one batched forward pass."""
    batch = prepare_batch(model, images, input_size)
    raw = capture(batch.net, batch.x, attention_dtype=attention_dtype)
    return build_explanations(model, batch, raw, topk)
