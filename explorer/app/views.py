"""What each view shows, as pure functions of a session and the controls.

No Gradio here and no tensor math: these call :mod:`explorer.analysis` and :mod:`explorer.render`
on the :class:`~explorer.capture.Explanation` the session holds, so every slider and click is
answered without running the model again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import analysis
from ..analysis import distance as dist
from ..analysis import posembed
from ..capture import Explanation
from ..errors import InputError
from ..images import patch_count_for
from ..render import figures, overlay
from .i18n import t


@dataclass
class Session:
    """One user's state: small, numpy only, deep-copyable."""

    model: str = ""  # spec of the model that produced ``exp``
    exp: Explanation | None = None
    #: the user's image, upright RGB uint8, as the attention tab shows it (at most DISPLAY_MAX_SIDE;
    #: a full-size one given here is fitted on first use)
    image: np.ndarray | None = None
    mask: np.ndarray | None = None  # object mask at the model crop's resolution (shapes examples)
    query: int | None = None  # token index; None = the layout's default (class token)
    notes: list = field(default_factory=list)
    forward_passes: int = 0  # how many times this session ran the model (for the benchmark)
    #: (image, its display version): enlarging a 600×400 photo costs 1.2 ms, twice per slider event
    display: tuple | None = field(default=None, repr=False, compare=False)
    #: the file as it was uploaded, decoded again only for the full-size download: a session keeps
    #: the shown image, not the full one (a 49-megapixel PNG of 190 KB took 148 MB per session)
    source: bytes | None = field(default=None, repr=False)
    full_size: tuple[int, int] | None = None  # (width, height) of the full image

    def size(self) -> tuple[int, int]:
        """(width, height) of the user's full image."""
        if self.full_size is not None:
            return self.full_size
        assert self.image is not None
        return self.image.shape[1], self.image.shape[0]

    def full_image(self) -> np.ndarray:
        """The user's image at full size (decoded again from the upload when the session keeps only
        the shown one)."""
        assert self.image is not None
        if self.source is None or self.full_size == (self.image.shape[1], self.image.shape[0]):
            return self.image
        from ..images import decode

        return decode(self.source).array

    def query_token(self) -> int:
        assert self.exp is not None
        return self.exp.layout.default_query() if self.query is None else self.query


def token_name(lang: str, exp: Explanation, token: int) -> str:
    lay = exp.layout
    if token < lay.num_prefix:
        role = lay.prefix_roles[token]
        if role == "cls":
            return t(lang, "token_class")
        if role == "dist":
            return t(lang, "token_distillation")
        return t(lang, "token_register", i=lay.prefix_roles[:token].count("reg") + 1)
    r, c = lay.patch_of_token(token)  # type: ignore[misc]
    # the token index is the number the patches view writes on the patch and the query box takes;
    # rows and columns are counted from 1, as people count them ("第 1 行")
    return t(lang, "token_patch", token=token, r=r + 1, c=c + 1)


#: the longest side of the image the attention tab shows. The view is 460 px tall and full screen on
#: a 1080p projector is 1920 px wide; a 12-MP photo sent at full size cost 2 s of encoding on the
#: server per slider event (the download keeps full-size overlays: explorer/export.py)
DISPLAY_MAX_SIDE = 1600


def display_image(s: Session) -> np.ndarray:
    """The user's image as the attention tab shows it: enlarged when tiny (64-px classroom scenes)
    so it shows on a projector, shrunk (area-averaged) when its longest side is over
    ``DISPLAY_MAX_SIDE``. Made once per image."""
    assert s.image is not None
    if s.display is None or s.display[0] is not s.image:
        s.display = (s.image, overlay.fit_for_display(s.image, 448, DISPLAY_MAX_SIDE))
    return s.display[1]


def _display_box(s: Session) -> tuple[float, float, float, float]:
    """The model's crop box in the displayed image's pixels."""
    assert s.exp is not None and s.image is not None
    disp = display_image(s)
    W, H = s.size()
    kx, ky = disp.shape[1] / W, disp.shape[0] / H
    x0, y0, x1, y1 = s.exp.box
    return x0 * kx, y0 * ky, x1 * kx, y1 * ky


def click_to_token(s: Session, x: float, y: float) -> int | None:
    """The patch token under a click at ``(x, y)`` on the displayed image; None outside the crop."""
    assert s.exp is not None
    x0, y0, x1, y1 = _display_box(s)
    if not (x0 <= x < x1 and y0 <= y < y1):
        return None
    rows, cols = s.exp.layout.grid
    c = min(cols - 1, int((x - x0) / (x1 - x0) * cols))
    r = min(rows - 1, int((y - y0) / (y1 - y0) * rows))
    return s.exp.layout.token_of_patch(r, c)


def rollout_view(s: Session, lang: str, *, fusion: str, discard: float, start_layer: int, opacity: float,
                 show_mask: bool) -> tuple[np.ndarray, str]:
    """The rollout overlay on the user's image, and a caption."""
    exp = s.exp
    assert exp is not None
    q = s.query_token()
    opts = analysis.RolloutOptions(head_fusion=fusion, discard_ratio=float(discard),
                                   start_layer=int(min(start_layer, exp.num_layers - 1)))
    row = exp.rollout_row(q, opts)
    pmap = analysis.patch_map(row, exp.layout.num_prefix, exp.layout.grid)
    disp = display_image(s)
    box = _display_box(s)
    img = overlay.overlay(disp, pmap, box=box, alpha=float(opacity), smooth=min(disp.shape[:2]) > 2 * max(exp.layout.grid) * 8 and exp.layout.num_patches > 100)
    patch = exp.layout.patch_of_token(q)
    if patch is not None:
        img = overlay.mark_patch(img, exp.layout.grid, q - exp.layout.num_prefix, box=box, copy=False)
    caption = [f"**{t(lang, 'rollout_title')}** · {t(lang, 'query')}{t(lang, 'colon')}{token_name(lang, exp, q)}"]
    if s.mask is not None:
        stats = analysis.mass_on(object_patches(s.mask, exp.box, exp.layout), pmap)
        if show_mask:
            img = overlay.mask_outline(img, s.mask, copy=False)
        caption.append(t(lang, "mask_share", mass=stats["mass"], area=stats["area"], ratio=stats["ratio"],
                         maxhit=t(lang, "yes" if stats["max_on_object"] else "no")))
    return img, "\n\n".join(caption)


def attention_tab(s: Session, lang: str, *, fusion: str = "mean", discard: float = 0.0, start_layer: int = 0,
                  opacity: float = 0.55, show_mask: bool = True, inner_layer: int = 0,
                  grid: bool = True) -> dict[str, Any]:
    """Everything the attention tab shows. ``grid=False`` (slider events) leaves out the layer ×
    head grid and the query, which depend only on the query token."""
    img, cap = rollout_view(s, lang, fusion=fusion, discard=discard, start_layer=int(start_layer or 0),
                            opacity=opacity, show_mask=bool(show_mask))
    inner, inner_md = inner_view(s, lang, int(inner_layer or 0))
    out: dict[str, Any] = {"overlay": img, "caption": cap, "inner": inner, "inner_md": inner_md}
    if grid:
        out["layer_head"] = layer_head_figure(s, lang)
        out["query"] = s.query_token()
    return out


def object_patches(mask: np.ndarray, box: tuple[float, float, float, float], layout) -> np.ndarray:
    """(rows, cols) bool: patches that overlap the object. ``mask`` is in original-image pixels;
    it is cropped to what the model saw and resized to the model input first."""
    import cv2

    x0, y0, x1, y1 = (int(round(v)) for v in box)
    m = mask[y0:y1, x0:x1].astype(np.uint8)
    h, w = layout.input_size
    if m.shape != (h, w):
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
    return analysis.object_patches(m.astype(bool), layout.grid)


def layer_head_figure(s: Session, lang: str):
    exp = s.exp
    assert exp is not None
    q = s.query_token()
    maps = analysis.query_maps(exp.attention, q, exp.layout)
    return figures.layer_head_grid(maps, title=t(lang, "layer_head_title", query=token_name(lang, exp, q)),
                                   layer_label=t(lang, "layer"), head_label=t(lang, "head"),
                                   value_label=t(lang, "weight"), row_label=t(lang, "pos_row"),
                                   col_label=t(lang, "pos_col"), token_label=t(lang, "token"),
                                   first_token=exp.layout.num_prefix)


def inner_view(s: Session, lang: str, layer: int) -> tuple[np.ndarray | None, str]:
    """TNT: inner attention inside the query patch; for a prefix token (which has no patch), inside
    the patch that token's rollout with the paper's settings reaches most."""
    exp = s.exp
    assert exp is not None
    if exp.inner_attention is None:
        return None, ""
    q = s.query_token()
    lay = exp.layout
    if q >= lay.num_prefix:
        patch = q - lay.num_prefix
    else:  # a prefix token has no patch: look inside the patch its rollout reaches most (once)
        patch = exp._cached(("inner_patch", q), lambda: int(np.argmax(
            exp.rollout_row(q, analysis.RolloutOptions())[lay.num_prefix:])))
    layer = int(min(max(layer, 0), exp.num_layers - 1))
    ph, pw = lay.patch_size
    m = analysis.inner_map(exp.inner_attention, patch, layer, patch_size=(ph, pw))
    r, c = divmod(patch, lay.grid[1])
    crop_patch = exp.crop[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw]
    img = overlay.word_panels(crop_patch, m)
    wr, wc = m.shape
    word = f"{ph // wr}×{pw // wc}" if ph % wr == 0 and pw % wc == 0 else f"{ph / wr:g}×{pw / wc:g}"
    title = t(lang, "inner_title", token=patch + lay.num_prefix, layer=layer + 1, n=wr * wc, word=word)
    even = 1.0 / (wr * wc)
    if float(m.max() - m.min()) <= 1e-4 * even:  # no word stands out: naming one would mislead
        title += t(lang, "inner_even", even=f"{100 * even:.3g}")
    else:
        top_r, top_c = divmod(int(np.argmax(m)), wc)
        digits = 3  # enough figures to tell the largest share from the even one
        while digits < 6 and f"{100 * float(m.max()):.{digits}g}" == f"{100 * even:.{digits}g}":
            digits += 1
        title += t(lang, "inner_most", row=top_r + 1, col=top_c + 1, share=f"{100 * float(m.max()):.{digits}g}",
                   even=f"{100 * even:.{digits}g}")
    return img, f"{title}\n\n{t(lang, 'howto_inner')}"


# ----------------------------------------------------------------------------- patches


def patches_view(s: Session, lang: str, kernel: int, stride: int,
                 calc_size: Any = "model") -> tuple[np.ndarray, str, Any, str]:
    """The model's own patch grid, the tensor shapes, and the overlap calculator on the model's
    input size (``calc_size="model"``) or on a square image of ``calc_size`` pixels."""
    exp = s.exp
    assert exp is not None
    lay = exp.layout
    crop = overlay.upscale_nearest(exp.crop, 448)
    grid_img = overlay.patch_grid(crop, lay.grid, first_index=lay.num_prefix)
    h, w = lay.input_size
    ph, pw = lay.patch_size
    D = exp.tokens.shape[-1]
    prefix = ", ".join(token_name(lang, exp, i) for i in range(lay.num_prefix))
    pipe = [
        f"{t(lang, 'pipe_image')}{t(lang, 'colon')}`{h} × {w} × 3`",
        t(lang, "pipe_patches", rows=lay.grid[0], cols=lay.grid[1], n=lay.num_patches, ph=ph, pw=pw,
          vals=ph * pw * 3) + f"{t(lang, 'colon')}`{lay.num_patches} × {ph * pw * 3}`",
        f"{t(lang, 'pipe_tokens')}{t(lang, 'colon')}`{lay.num_patches} × {D}`",
    ]
    if lay.num_prefix:
        pipe.append(t(lang, "pipe_cls", prefix=prefix) + f"{t(lang, 'colon')}`{lay.num_tokens} × {D}`")
    pipe.append(t(lang, "pipe_blocks", L=exp.num_layers) + f"{t(lang, 'colon')}`{lay.num_tokens} × {D}`")
    shapes_md = (f"**{t(lang, 'shapes_pipeline')}**\n\n" + "\n".join(f"{i + 1}. {p}" for i, p in enumerate(pipe))
                 + "\n\n" + t(lang, "grid_note", prefix=_grid_prefix_note(lang, lay)))
    size = max(h, w) if h == w else h
    if str(calc_size) != "model":
        try:
            size = int(calc_size)
        except (TypeError, ValueError):
            raise InputError(f"image size must be 'model' or a number of pixels; got {calc_size!r}",
                             code="bad_option", name="calc_size") from None
        if not 16 <= size <= 1024:
            raise InputError(f"image size must lie in 16..1024 px; got {size}", code="bad_option",
                             name="calc_size")
    text, fig = overlap_calculator(lang, size, int(kernel), int(stride))
    return grid_img, shapes_md, fig, text


def _grid_prefix_note(lang: str, lay) -> str:
    """Why the patches view's numbers do not start at 0."""
    if not lay.num_prefix:
        return ""
    if lay.num_prefix == 1 and lay.prefix_roles[0] == "cls":
        return t(lang, "grid_note_cls")
    return t(lang, "grid_note_prefix", last=lay.num_prefix - 1, n=lay.num_prefix)


def overlap_calculator(lang: str, size: int, kernel: int, stride: int):
    """Tokens and attention cost for a kernel/stride on a square image (LESSONS §1)."""
    if kernel < 1 or stride < 1 or kernel > size:
        raise InputError(f"kernel must lie in 1..{size} and stride ≥ 1", code="bad_option", name="kernel")
    n = patch_count_for(size, kernel, stride)
    n_base = patch_count_for(size, kernel, kernel)
    N, N0 = n * n, n_base * n_base
    cost = (N * N) / (N0 * N0)
    if stride < kernel:
        overlap = t(lang, "overlap_yes", times=math.ceil(kernel / stride) ** 2)
    elif stride > kernel:
        overlap = t(lang, "overlap_gap")
    else:
        overlap = t(lang, "overlap_no")
    text = t(lang, "overlap_text", k=kernel, s=stride, size=size, n=n, N=N, vals=kernel * kernel * 3,
             pairs=N * N, cost=cost, overlap=overlap)
    strides = np.arange(1, kernel + 1)
    toks = np.array([patch_count_for(size, kernel, int(st)) ** 2 for st in strides])
    fig = figures.token_cost_plot(strides, toks, toks.astype(float) ** 2 / (N0 * N0), stride,
                                  title=t(lang, "cost_title", k=kernel), x_label=t(lang, "stride"),
                                  tokens_label=t(lang, "tokens"), cost_label=t(lang, "rel_cost"))
    return text, fig


def _pair(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _conv_text(conv: Any) -> str:
    pad = tuple(conv.padding) if isinstance(conv.padding, tuple) else conv.padding
    extra = f", padding={pad}" if pad not in ((0, 0), 0, "valid") else ""
    return (f"Conv2d({conv.in_channels}, {conv.out_channels}, kernel_size={tuple(conv.kernel_size)}, "
            f"stride={tuple(conv.stride)}{extra})")


def patch_embed_note(loaded: Any, lang: str) -> str:
    """The patches view's check, read from the loaded model's own modules. A ViT's patch embedding
    is one convolution with kernel = stride = P. TNT cuts the image into non-overlapping patches
    with ``nn.Unfold`` (kernel = stride = P) and then embeds each patch's pixel words with a small
    convolution whose windows overlap (7×7, stride 4 in TNT-S): that one is not the patch cut."""
    m = loaded.model
    if hasattr(m, "pixel_embed"):
        pe = m.pixel_embed
        k, st = _pair(pe.unfold.kernel_size), _pair(pe.unfold.stride)
        inner = loaded.facts.inner or {}
        pr, pc = inner.get("pixel_grid", (0, 0))
        return t(lang, "conv_note_tnt", unfold=f"Unfold(kernel_size={k}, stride={st})", k=k[0], s=st[0],
                 conv=_conv_text(pe.proj), ck=pe.proj.kernel_size[0], cs=pe.proj.stride[0], pr=pr, pc=pc)
    conv = m.patch_embed.proj
    return t(lang, "conv_note", layer=_conv_text(conv), k=conv.kernel_size[0], s=conv.stride[0])


# ----------------------------------------------------------------------------- position embeddings


def posembed_view(s: Session, lang: str, pos_grid: tuple[int, int]):
    exp = s.exp
    assert exp is not None
    pos = exp.position_embeddings.get("patch")
    if pos is None:
        return None, t(lang, "pos_none"), None
    D = pos.shape[1]
    learned = posembed.similarity_tiles(pos, pos_grid)
    grid = (int(pos_grid[0]), int(pos_grid[1]))
    panels = [(t(lang, "pos_learned"), learned),
              (t(lang, "pos_1d"), posembed.reference_tiles("1d", pos.shape[0], D, grid)),
              (t(lang, "pos_2d"), posembed.reference_tiles("2d", pos.shape[0], D, grid))]
    fig = figures.similarity_panels(panels, title=t(lang, "pos_title"), row_label=t(lang, "pos_row"),
                                    col_label=t(lang, "pos_col"), stretch=(1, 2),
                                    stretch_label=t(lang, "pos_stretch"))
    nb = posembed.neighbour_structure(pos, pos_grid, sim=learned)
    text = t(lang, "pos_neighbour", **nb)
    pixel_fig = None
    pix = exp.position_embeddings.get("pixel")
    if pix is not None:
        sim = posembed.cosine_similarity(pix)
        side = int(round(math.sqrt(pix.shape[0])))
        tiles = [(f"{i}", sim[i].reshape(side, side)) for i in range(pix.shape[0])]
        pixel_fig = figures.small_heatmaps(tiles, title=t(lang, "pixel_pos_title", n=pix.shape[0]))
    return fig, text, pixel_fig


# ----------------------------------------------------------------------------- distance


def distance_view(s: Session, lang: str):
    exp = s.exp
    assert exp is not None
    lay = exp.layout
    mad = exp.attention_distance()
    L = exp.num_layers
    rf = dist.conv_receptive_field(L)
    fig = figures.distance_plot(
        mad, rf, dist.conv_mean_distance(L), dist.uniform_distance(lay), title=t(lang, "mad_title"),
        x_label=t(lang, "mad_x"), y_label=t(lang, "mad_y"), head_label=t(lang, "head"),
        rf_label=t(lang, "mad_rf"), conv_mad_label=t(lang, "mad_conv"), uniform_label=t(lang, "mad_uniform"),
        layer_label=t(lang, "layer"), px_label=t(lang, "px"))
    text = t(lang, "mad_summary", lo=float(mad[0].min()), hi=float(mad[0].max()), L=L, rf=int(rf[-1]),
             size=lay.input_size[1])
    return fig, text


# ----------------------------------------------------------------------------- model card


REFERENCE_MODEL = "vit_base_patch16_224"


def reference_facts() -> Any:
    """ViT-Base/16's figures (the paper's Table 1 row), read from timm's own architecture built on
    the meta device: no weights, no download, 0.1 s, kept once made."""
    global _REFERENCE
    if _REFERENCE is None:
        import timm
        import torch

        from ..families import model_facts

        with torch.device("meta"):
            _REFERENCE = model_facts(timm.create_model(REFERENCE_MODEL, pretrained=False))
    return _REFERENCE


_REFERENCE = None


def _card_row(lang: str, name: str, f: Any) -> str:
    p = f"{f.patch_size[0]}" if f.patch_size[0] == f.patch_size[1] else f"{f.patch_size[0]}×{f.patch_size[1]}"
    return t(lang, "card_row", name=name, p=p, L=f.layers, D=f.width, mlp=f.mlp_size, H=f.heads,
             params=f.params_text(), T=f.tokens)


def model_card(loaded: Any, lang: str) -> str:
    f = loaded.facts
    howto = t(lang, "howto_model") + " " + t(lang, "howto_model_bundled" if loaded.source == "bundled"
                                            else "howto_model_other")
    rows = [howto, "", t(lang, "card_header"), _card_row(lang, f"**{loaded.name}**", f)]
    try:
        rows.append(_card_row(lang, t(lang, "card_ref_name", arch=REFERENCE_MODEL), reference_facts()))
    except Exception:  # noqa: BLE001 - a timm without this architecture: the card goes without the row
        pass
    names = {"cls": t(lang, "token_class"), "dist": t(lang, "token_distillation"), "reg": t(lang, "token_registers")}
    if f.prefix_roles:
        counts: dict[str, int] = {}
        for r in f.prefix_roles:
            counts[r] = counts.get(r, 0) + 1
        prefix = " + ".join(f"{n}× {names[r]}" if n > 1 else names[r] for r, n in counts.items())
    else:
        prefix = t(lang, "card_prefix_none")
    out = "\n".join(rows) + "\n\n" + t(lang, "card_layout", prefix=prefix, rows=f.grid[0], cols=f.grid[1],
                                         T=f.tokens, D=f.width, h=f.input_size[0], w=f.input_size[1],
                                         pos=t(lang, f"pos_kind_{f.pos_embed}"))
    if f.inner:
        out += "\n\n" + t(lang, "card_inner", pr=f.inner["pixel_grid"][0], pc=f.inner["pixel_grid"][1],
                          w=f.inner["width"], h=f.inner["heads"], mlp=f.inner["mlp"])
    notes = loaded.notes or {}
    if notes.get("curve"):
        st = notes.get("settings", {})
        out += "\n\n" + t(lang, "card_training", images=int(notes["curve"]["images"][-1]),
                          minutes=float(notes.get("minutes", 0)), threads=st.get("threads", "?"))
    return out


def learning_curve_figure(loaded: Any, lang: str):
    curve = (loaded.notes or {}).get("curve")
    if not curve:
        return None
    return figures.learning_curve(curve, title=t(lang, "curve_title"), x_label=t(lang, "curve_x"),
                                  acc_label=t(lang, "curve_acc"), loss_label=t(lang, "curve_loss"))
