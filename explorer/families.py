"""One small spec per supported model family: where attention, tokens and position embeddings live.

Only this module, :mod:`explorer.zoo` and :mod:`explorer.capture` know timm's internals. Two
families are supported:

* ``vit``: timm ``VisionTransformer`` and its subclasses (ViT, DeiT, DeiT distilled, register and
  DINOv2-style models, global-average-pool models without a class token);
* ``tnt``: timm ``TNT`` (Transformer in Transformer), with an outer attention over patch tokens
  and an inner attention over the "pixel" sub-tokens of each patch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ModelSourceError

#: timm modules whose models this explorer can open, and what family they belong to.
SUPPORTED_TIMM_MODULES = {"vision_transformer": "vit", "deit": "vit", "tnt": "tnt"}

PREFIX_ROLE_NAMES = {"cls": "class", "dist": "distillation", "reg": "register"}


@dataclass(frozen=True)
class TokenLayout:
    """Where every token of a sequence comes from.

    Sequence order is ``prefix_roles`` first (class, distillation, register tokens; possibly none),
    then the patches row by row.
    """

    prefix_roles: tuple[str, ...]  # e.g. ("cls",), ("cls", "dist"), ("cls", "reg", ...), ()
    grid: tuple[int, int]  # (rows, cols) of patches; need not be square
    patch_size: tuple[int, int]  # (height, width) of one patch in model-input pixels
    inner_grid: tuple[int, int] | None = None  # TNT: (rows, cols) of pixel tokens inside a patch

    @property
    def num_prefix(self) -> int:
        return len(self.prefix_roles)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the model input covered by the patch grid."""
        return self.grid[0] * self.patch_size[0], self.grid[1] * self.patch_size[1]

    @property
    def has_class_token(self) -> bool:
        return "cls" in self.prefix_roles

    def token_of_patch(self, row: int, col: int) -> int:
        return self.num_prefix + row * self.grid[1] + col

    def patch_of_token(self, token: int) -> tuple[int, int] | None:
        """(row, col) of a patch token, or None for a prefix token."""
        if token < self.num_prefix:
            return None
        return divmod(token - self.num_prefix, self.grid[1])

    def token_label(self, token: int) -> str:
        """A short English name: ``class``, ``register 2``, ``patch (3, 4)``."""
        if token < self.num_prefix:
            role = self.prefix_roles[token]
            name = PREFIX_ROLE_NAMES[role]
            if role == "reg":
                return f"{name} {self.prefix_roles[:token].count('reg') + 1}"
            return name
        r, c = self.patch_of_token(token)  # type: ignore[misc]
        return f"patch ({r}, {c})"

    def default_query(self) -> int:
        """The class token when there is one, otherwise the centre patch."""
        if self.has_class_token:
            return self.prefix_roles.index("cls")
        return self.token_of_patch(self.grid[0] // 2, self.grid[1] // 2)


@dataclass(frozen=True)
class ModelFacts:
    """Architecture figures as the ViT paper's Table 1 prints them, read from a built model."""

    family: str
    patch_size: tuple[int, int]
    layers: int
    width: int
    mlp_size: int
    heads: int
    params: int
    tokens: int
    prefix_roles: tuple[str, ...]
    grid: tuple[int, int]
    input_size: tuple[int, int]
    pos_embed: str  # "learned (with prefix rows)", "learned (patches only)", "none"
    inner: dict = field(default_factory=dict)  # TNT: inner width, heads, pixel-token grid

    def params_text(self) -> str:
        p = self.params
        return f"{p / 1e6:.1f}M" if p >= 1e6 else f"{p / 1e3:.0f}K"


def is_backbone(model: nn.Module) -> bool:
    """Built without a classifier head (``num_classes=0``, as timm builds DINOv2): its output is
    pooled features, not class logits."""
    return getattr(model, "num_classes", None) == 0


def family_of(model: nn.Module) -> str:
    """``"vit"`` or ``"tnt"``; raises :class:`ModelSourceError` for anything else."""
    from timm.models.tnt import TNT
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, TNT):
        return "tnt"
    if isinstance(model, VisionTransformer):
        attn = model.blocks[0].attn if len(model.blocks) else None
        if attn is None or not hasattr(attn, "attn_drop") or not hasattr(attn, "fused_attn"):
            raise ModelSourceError(
                f"{type(model).__name__} uses a block type ({type(model.blocks[0]).__name__}) whose "
                "attention cannot be captured. Supported: ViT, DeiT (incl. distilled), register and "
                "DINOv2-style ViTs with standard blocks, and TNT.",
                code="unsupported_block",
            )
        return "vit"
    raise ModelSourceError(
        f"{type(model).__name__} is not a Vision Transformer this explorer supports. "
        "Supported families: ViT, DeiT (incl. distilled), register and DINOv2-style ViTs, and TNT.",
        code="unsupported_family",
        arch=type(model).__name__,
    )


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The outer (token-to-token) attention module of every block, in order."""
    if family_of(model) == "tnt":
        return [blk.attn_out for blk in model.blocks]
    return [blk.attn for blk in model.blocks]


def inner_attention_modules(model: nn.Module) -> list[nn.Module]:
    """TNT's inner (pixel-to-pixel within one patch) attention of every block; [] for ViTs."""
    if family_of(model) == "tnt":
        return [blk.attn_in for blk in model.blocks]
    return []


def prefix_roles(model: nn.Module) -> tuple[str, ...]:
    if family_of(model) == "tnt":
        return ("cls",)
    roles: list[str] = []
    if getattr(model, "cls_token", None) is not None:
        roles.append("cls")
    if getattr(model, "dist_token", None) is not None:
        roles.append("dist")
    roles += ["reg"] * int(getattr(model, "num_reg_tokens", 0) or 0)
    if len(roles) != model.num_prefix_tokens:
        raise ModelSourceError(
            f"token layout not understood: {model.num_prefix_tokens} prefix tokens but roles {roles}",
            code="layout",
        )
    return tuple(roles)


def patch_size(model: nn.Module) -> tuple[int, int]:
    embed = model.pixel_embed if family_of(model) == "tnt" else model.patch_embed
    return tuple(int(p) for p in embed.patch_size)  # type: ignore[return-value]


def default_grid(model: nn.Module) -> tuple[int, int]:
    embed = model.pixel_embed if family_of(model) == "tnt" else model.patch_embed
    return tuple(int(g) for g in embed.grid_size)  # type: ignore[return-value]


def default_input_size(model: nn.Module) -> tuple[int, int]:
    """(height, width) the model was built for: its patch grid times its patch size."""
    g, p = default_grid(model), patch_size(model)
    return g[0] * p[0], g[1] * p[1]


def supports_dynamic_size(model: nn.Module) -> bool:
    """Whether the model accepts inputs other than its training size (non-square among them)."""
    return family_of(model) == "vit" and bool(getattr(model, "dynamic_img_size", False))


def layout_for(model: nn.Module, input_hw: tuple[int, int]) -> TokenLayout:
    ps = patch_size(model)
    grid = (input_hw[0] // ps[0], input_hw[1] // ps[1])
    inner = None
    if family_of(model) == "tnt":
        inner = tuple(int(n) for n in model.pixel_embed.new_patch_size)
    return TokenLayout(prefix_roles(model), grid, ps, inner)  # type: ignore[arg-type]


def position_embeddings(model: nn.Module) -> dict[str, torch.Tensor]:
    """Learned position embeddings, patch rows only, as ``(rows*cols, D)`` (or TNT's pixel ones).

    Returns a dict: ``{"patch": (N, D)}`` for ViTs with ``pos_embed`` (prefix rows dropped whether
    or not the model stores them), ``{"patch": (N, D), "pixel": (n_in, D_in)}`` for TNT, ``{}``
    for a model without absolute position embeddings.
    """
    fam = family_of(model)
    n = default_grid(model)[0] * default_grid(model)[1]
    if fam == "tnt":
        patch = model.patch_pos.detach()[0, -n:]
        pixel = model.pixel_pos.detach()[0]  # (D_in, h, w)
        return {"patch": patch, "pixel": pixel.flatten(1).T}
    pos = getattr(model, "pos_embed", None)
    if pos is None:
        return {}
    return {"patch": pos.detach()[0, -n:]}


def model_facts(model: nn.Module) -> ModelFacts:
    fam = family_of(model)
    grid = default_grid(model)
    ps = patch_size(model)
    roles = prefix_roles(model)
    blk = model.blocks[0]
    if fam == "tnt":
        width = model.embed_dim
        heads = blk.attn_out.num_heads
        mlp = blk.mlp.fc2.in_features  # the hidden size: a gated MLP's fc1 holds two halves
        inner = {
            "width": int(blk.attn_in.v.in_features),
            "heads": int(blk.attn_in.num_heads),
            "mlp": int(blk.mlp_in.fc2.in_features),
            "pixel_grid": tuple(int(n) for n in model.pixel_embed.new_patch_size),
        }
        pos = "learned patch_pos + pixel_pos"
    else:
        width = model.embed_dim
        heads = blk.attn.num_heads
        mlp = blk.mlp.fc2.in_features  # the hidden size: a gated MLP's fc1 holds two halves
        inner = {}
        if getattr(model, "pos_embed", None) is None:
            pos = "none"
        elif model.no_embed_class:
            pos = "learned (patches only)"
        else:
            pos = "learned (incl. prefix)"
    return ModelFacts(
        family=fam,
        patch_size=ps,
        layers=len(model.blocks),
        width=int(width),
        mlp_size=int(mlp),
        heads=int(heads),
        params=sum(p.numel() for p in model.parameters()),
        tokens=len(roles) + grid[0] * grid[1],
        prefix_roles=roles,
        grid=grid,
        input_size=(grid[0] * ps[0], grid[1] * ps[1]),
        pos_embed=pos,
        inner=inner,
    )
