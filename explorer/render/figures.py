"""Plotly figures; numpy in, figures out, no torch. Titles and axis labels come from the caller
(already translated), so these functions know nothing about languages."""
from __future__ import annotations

import functools
import re
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

FONT = "Noto Sans CJK SC, Noto Sans SC, Microsoft YaHei, PingFang SC, Helvetica, Arial, sans-serif"
PALETTE = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#EECA3B", "#B279A2", "#FF9DA6",
           "#9D755D", "#BAB0AC", "#1F77B4", "#D62728"]


def _layout(fig: go.Figure, title: str, height: int) -> go.Figure:
    fig.update_layout(**_base(title, height))
    return fig


def _base(title: str, height: int) -> dict:
    return dict(title=dict(text=title, x=0.01, font=dict(size=16)), height=height,
                margin=dict(l=50, r=20, t=60, b=50), font=dict(family=FONT, size=13),
                plot_bgcolor="white", paper_bgcolor="white")


#: build the figures of :func:`_figure` with Plotly's property validation. Off in the app: the
#: figures are ours, and validating them took 8-13 ms of every figure's 10-14 (four figures after
#: each explanation, the layer × head grid on every click). A test builds each figure of
#: :func:`_figure` with and without it: valid, and the same JSON.
VALIDATE = False


def _figure(data: list[dict], title: str, height: int, **layout) -> go.Figure:
    """The whole figure in one constructor call, unvalidated unless :data:`VALIDATE` (then
    Plotly validates every property once, where ``update_layout``/``update_xaxes``/
    ``make_subplots`` each go through its update machinery: a distance plot 11 ms instead of 42).
    A trace's named colour scale is resolved here, as validation would (plotly.js knows only a
    few names)."""
    if not VALIDATE:
        data = [{**d, "colorscale": _colorscale(d["colorscale"])} if isinstance(d.get("colorscale"), str) else d
                for d in data]
    return Figure(data=data, layout={**_base(title, height), **layout}, _validate=VALIDATE)


class Figure(go.Figure):
    """A ``go.Figure`` whose :meth:`to_json`, what Gradio's ``Plot`` sends to the browser, skips
    what Plotly's own writer spends on things that buy nothing here (the layer × head grid of a
    1370-token model, sent on every click: 20-21 ms → 7-8 ms, 3 of them base64):

    * the deep copy of the whole figure, arrays included, before its arrays are base64-encoded:
      here only dicts and lists are copied on the way, and each array is encoded by Plotly's own
      ``to_typed_array_spec`` where Plotly's ``convert_to_base64`` would encode it;
    * scanning the whole JSON, base64 included, for characters to escape: ``<``, ``>``, U+2028
      and U+2029 are escaped in the JSON around the arrays, then the base64 (which has none of
      them) is put in;
    * escaping ``/`` as ``\\u002f``: 53,000 times in the grid's base64, 16 % more bytes. ``<``
      escaped is what keeps the JSON safe inside an HTML script; a ``/`` alone cannot end one.

    The JSON parses to exactly what Plotly's ``to_json`` gives (a test checks every figure).
    """

    def to_json(self, *args, **kwargs) -> str:
        if args or kwargs or self._frame_objs:
            return super().to_json(*args, **kwargs)
        try:  # orjson, as Plotly's writer itself uses when it is there (whatever its engine setting)
            import orjson
        except ImportError:  # pragma: no cover - Gradio depends on orjson
            return super().to_json()
        blobs: list[bytes] = []
        fig = {"data": [_encoded(t, blobs) for t in self._data], "layout": _encoded(self._layout, blobs)}
        for trace in fig["data"]:
            trace.pop("uid", None)  # as plotly.io.to_json(remove_uids=True)
        try:
            out = orjson.dumps(fig, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)
        except TypeError:  # something orjson cannot write: Plotly's own path cleans it first
            return super().to_json()
        for unsafe, safe in _ESCAPES:  # UTF-8 never has these bytes inside another character
            out = out.replace(unsafe, safe)
        if blobs:
            parts = _BLOB.split(out)  # text, index, text, index, ..., text
            if len(parts) != 2 * len(blobs) + 1 or parts[1::2] != [b"%d" % i for i in range(len(blobs))]:
                return super().to_json()  # a string of the figure looked like a placeholder
            parts[1::2] = blobs
            out = b"".join(parts)
        return out.decode("utf8")


#: what plotly.io's JSON writer escapes, except ``/``, as UTF-8
_ESCAPES = ((b"<", b"\\u003c"), (b">", b"\\u003e"), ("\u2028".encode(), b"\\u2028"),
            ("\u2029".encode(), b"\\u2029"))
#: where :func:`_encoded` left an array's base64 out: its index between two U+0001, as orjson escapes them
_BLOB = re.compile(rb"\\u0001(\d+)\\u0001")


def _encoded(obj, blobs: list[bytes]):
    """A figure's property tree as Plotly's ``to_dict`` leaves it for JSON: dicts and lists
    copied, every array that is a dict's value (outside the keys Plotly skips) replaced by its
    typed-array spec, strings, numbers and arrays inside lists left as they are (Plotly's own
    ``convert_to_base64`` rules, without visiting every string of a list of category names).
    Each spec's base64 goes to ``blobs``, a placeholder in its place."""
    from _plotly_utils.utils import is_homogeneous_array, is_skipped_key, to_typed_array_spec

    def array(v):
        spec = to_typed_array_spec(v)
        if isinstance(spec, dict) and isinstance(spec.get("bdata"), str):
            blobs.append(spec["bdata"].encode("ascii"))
            spec["bdata"] = f"\x01{len(blobs) - 1}\x01"
        return spec

    def walk(o):
        if isinstance(o, dict):
            return {k: v if is_skipped_key(k) or type(v) in _LEAVES
                    else array(v) if is_homogeneous_array(v) else walk(v)
                    for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            if all(type(v) in _LEAVES for v in o):
                return list(o)
            return [walk(v) for v in o]
        return o

    return walk(obj)


#: leaves convert_to_base64 would look at and leave alone
_LEAVES = frozenset((str, int, float, bool, type(None)))


@functools.lru_cache(maxsize=None)
def _colorscale(name: str) -> tuple[tuple[float, str], ...]:
    """A named Plotly colour scale (``"Inferno"``, ``"RdBu_r"``) as (position, colour) pairs,
    resolved by the validator Plotly itself uses for colour scales, so the JSON equals a validated
    figure's (``plotly.colors.get_colorscale`` differs in the last digit of some positions). The
    class lives in ``_plotly_utils.basevalidators`` in every Plotly from 4 on, including those
    whose generated per-property validators were reorganised."""
    from _plotly_utils.basevalidators import ColorscaleValidator

    scale = ColorscaleValidator("colorscale", "heatmap").validate_coerce(name)
    return tuple((float(p), str(c)) for p, c in scale)


#: tile axes: no ticks, grid or zero line; rows top down, square cells
_TILE_X = dict(showticklabels=False, showgrid=False, zeroline=False)
_TILE_Y = dict(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed", scaleanchor="x")


def tile(stack: np.ndarray, gap: int = 1) -> np.ndarray:
    """(R, C, h, w) -> (R·(h+gap) - gap, C·(w+gap) - gap) with NaN gaps between tiles."""
    R, C, h, w = stack.shape
    out = np.full((R * (h + gap) - gap, C * (w + gap) - gap), np.nan, dtype=np.float32)
    for i in range(R):
        for j in range(C):
            out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = stack[i, j]
    return out


def layer_head_grid(maps: np.ndarray, *, title: str, layer_label: str, head_label: str,
                    value_label: str, row_label: str = "row", col_label: str = "col",
                    token_label: str = "token", first_token: int = 0) -> go.Figure:
    """(L, H, rows, cols) attention maps as an L×H grid of tiles, each scaled to its own maximum;
    hover shows layer, head, the patch (its token index, row, column) and the raw attention weight.
    Layers, heads, rows and columns are counted from 1; the token index is the sequence position
    (``first_token`` for the top-left patch: the number of prefix tokens).

    The axes are categories named after the layer and row (y) and the head and column (x), so the
    hover data per cell is two float32 numbers, patch and weight: at 1370 tokens the JSON sent on
    every click went from 5.2 MB (four float64 numbers per cell) to 1.9 MB."""
    L, H, rows, cols = maps.shape
    peak = maps.reshape(L, H, -1).max(-1)[..., None, None]
    z = tile(maps / np.maximum(peak, 1e-12))
    raw = tile(maps)
    gap = 1
    patch = tile(np.broadcast_to(np.arange(first_token, first_token + rows * cols, dtype=np.float32)
                                 .reshape(rows, cols), maps.shape))
    custom = np.stack([np.nan_to_num(patch, nan=-1), np.nan_to_num(raw, nan=-1)], -1).astype(np.float32)
    # category names must be unique: a gap between tiles is named by a run of spaces
    ys = [f"{layer_label} {i // (rows + gap) + 1} · {row_label} {i % (rows + gap) + 1}" if i % (rows + gap) < rows
          else " " * (i // (rows + gap) + 1) for i in range(z.shape[0])]
    xs = [f"{head_label} {j // (cols + gap) + 1} · {col_label} {j % (cols + gap) + 1}" if j % (cols + gap) < cols
          else " " * (j // (cols + gap) + 1) for j in range(z.shape[1])]
    heat = dict(type="heatmap", z=z, x=xs, y=ys, customdata=custom, colorscale="Inferno", showscale=False,
                hoverongaps=False,
                hovertemplate=(f"%{{y}} · %{{x}}<br>{token_label} %{{customdata[0]}}: {value_label} "
                               f"%{{customdata[1]:.4f}}<extra></extra>"))
    xaxis = {**_TILE_X, "type": "category", "tickvals": [j * (cols + gap) + (cols - 1) / 2 for j in range(H)],
             "ticktext": [f"{head_label} {j + 1}" for j in range(H)], "showticklabels": True, "side": "top"}
    yaxis = {**_TILE_Y, "type": "category", "tickvals": [i * (rows + gap) + (rows - 1) / 2 for i in range(L)],
             "ticktext": [f"{layer_label} {i + 1}" for i in range(L)], "showticklabels": True, "scaleratio": 1}
    return _figure([heat], title, max(420, min(1100, 90 + L * 95)), xaxis=xaxis, yaxis=yaxis)


def similarity_panels(panels: Sequence[tuple[str, np.ndarray]], *, title: str, max_tiles: int = 16,
                      row_label: str = "row", col_label: str = "col", sim_label: str = "cos",
                      stretch: Sequence[int] = (), stretch_label: str = "colours {lo:.2f} to {hi:.2f}") -> go.Figure:
    """Position-embedding similarity as in ViT Fig. 7: one panel per (name, (rows, cols, rows, cols)).

    One heatmap trace per panel, side by side on one pair of axes (subplots cost ~10× more to
    build). Grids larger than ``max_tiles`` a side show every k-th position's tile. Panels whose
    index is in ``stretch`` are coloured from their own minimum to maximum (named under the
    panel's title), the others on the colour bar's -1 to 1: sine-cosine codes are similar
    everywhere (0.4 to 1), and on -1 to 1 their structure was all the same red. Every panel's
    values are its true cosines, which the hover shows.
    """
    blocks = []
    for k, (name, sim) in enumerate(panels):
        rows, cols = sim.shape[:2]
        rs = np.unique(np.linspace(0, rows - 1, min(rows, max_tiles)).round().astype(int))
        cs = np.unique(np.linspace(0, cols - 1, min(cols, max_tiles)).round().astype(int))
        z = tile(sim[rs][:, cs])
        rr = np.full(z.shape, -1, dtype=np.int16)  # grid indices: small typed arrays in the JSON
        cc = np.full(z.shape, -1, dtype=np.int16)
        for i, r in enumerate(rs):
            for j, c in enumerate(cs):
                sl = np.s_[i * (rows + 1):i * (rows + 1) + rows, j * (cols + 1):j * (cols + 1) + cols]
                rr[sl], cc[sl] = r + 1, c + 1  # counted from 1, as in the other views
        lo, hi = (float(np.nanmin(z)), float(np.nanmax(z))) if k in stretch else (-1.0, 1.0)
        if k in stretch:
            name = f"{name}<br><sub>{stretch_label.format(lo=lo, hi=hi)}</sub>"
        elif stretch:  # a blank second line keeps the panel titles on one baseline
            name = f"{name}<br><sub> </sub>"
        blocks.append((name, z, np.stack([rr, cc], -1), lo, hi if hi > lo else lo + 1e-6))
    height = max(b[1].shape[0] for b in blocks)
    gap = max(3, height // 12)
    traces, centres, x = [], [], 0
    hover = (f"({row_label} %{{customdata[0]}}, {col_label} %{{customdata[1]}}) {sim_label} %{{z:.3f}}"
             "<extra></extra>")
    for k, (name, z, custom, lo, hi) in enumerate(blocks):
        pad = height - z.shape[0]
        traces.append(dict(type="heatmap", z=np.pad(z, ((0, pad), (0, 0)), constant_values=np.nan),
                           customdata=np.pad(custom, ((0, pad), (0, 0), (0, 0)), constant_values=-1),
                           x0=x, dx=1, zmin=lo, zmax=hi, colorscale="RdBu_r", hoverongaps=False,
                           showscale=k == 0, colorbar=dict(thickness=12, len=0.8), hovertemplate=hover))
        centres.append(x + (z.shape[1] - 1) / 2)
        x += z.shape[1] + gap
    xaxis = {**_TILE_X, "tickvals": centres, "ticktext": [b[0] for b in blocks], "showticklabels": True,
             "side": "top", "tickfont": dict(size=14)}
    # two-line panel names need room under the title (at the default top margin the title ran
    # into the first panel's name)
    margin = dict(l=50, r=20, t=100 if stretch else 60, b=30)
    return _figure(traces, title, 500 if stretch else 480, xaxis=xaxis, yaxis=_TILE_Y, margin=margin)


def small_heatmaps(panels: Sequence[tuple[str, np.ndarray]], *, title: str, per_row: int = 8) -> go.Figure:
    """Many small heatmaps (e.g. TNT pixel-position similarity) tiled in one trace."""
    h, w = panels[0][1].shape
    n = len(panels)
    R = int(np.ceil(n / per_row))
    C = min(n, per_row)
    stack = np.full((R, C, h, w), np.nan, dtype=np.float32)
    for k, (_, m) in enumerate(panels):
        stack[k // C, k % C] = m
    heat = dict(type="heatmap", z=tile(stack), colorscale="RdBu_r", zmin=-1, zmax=1, hoverongaps=False,
                colorbar=dict(thickness=12), hovertemplate="%{z:.3f}<extra></extra>")
    return _figure([heat], title, max(260, 80 + R * 140), xaxis=_TILE_X, yaxis=_TILE_Y)


def distance_plot(mad: np.ndarray, conv_rf: np.ndarray, conv_mad: np.ndarray, uniform: float, *,
                  title: str, x_label: str, y_label: str, head_label: str, rf_label: str,
                  conv_mad_label: str, uniform_label: str, layer_label: str = "layer",
                  px_label: str = "px") -> go.Figure:
    """Mean attention distance of every head against depth (ViT Fig. 7 right), with the receptive
    field of stacked 3×3 convolutions on the same axes."""
    L, H = mad.shape
    data = [dict(type="scatter", x=np.arange(1, L + 1) + (h - (H - 1) / 2) * 0.04, y=mad[:, h], mode="markers",
                 name=f"{head_label} {h + 1}", marker=dict(size=9, color=PALETTE[h % len(PALETTE)], opacity=0.85),
                 hovertemplate=f"{head_label} {h + 1}, {layer_label} %{{x:.0f}}: %{{y:.1f}} {px_label}<extra></extra>")
            for h in range(H)]
    depth = np.arange(1, len(conv_rf) + 1)
    data.append(dict(type="scatter", x=depth, y=conv_rf, mode="lines+markers", name=rf_label,
                     line=dict(color="black", dash="dot"), marker=dict(symbol="square", size=6)))
    data.append(dict(type="scatter", x=depth, y=conv_mad, mode="lines", name=conv_mad_label,
                     line=dict(color="grey", dash="dash")))
    # the uniform-attention level as a line across the plot, labelled at its left end
    hline = dict(type="line", xref="x domain", x0=0, x1=1, yref="y", y0=uniform, y1=uniform,
                 line=dict(color="#E45756", dash="dashdot"))
    label = dict(text=uniform_label, xref="x domain", x=0, yref="y", y=uniform, showarrow=False,
                 xanchor="left", yanchor="bottom")
    return _figure(data, title, 480, shapes=[hline], annotations=[label],
                   xaxis=dict(title=dict(text=x_label), dtick=1, range=[0.5, L + 0.5], gridcolor="#eee"),
                   yaxis=dict(title=dict(text=y_label), rangemode="tozero", gridcolor="#eee"),
                   legend=dict(orientation="v", x=1.01, y=1))


def tsne_plot(panels: Sequence[dict], *, title: str) -> go.Figure:
    """Side-by-side t-SNE scatters. Each panel: ``{"title", "xy" (n, 2), "groups" (n,) str,
    "hover" (n,) str, "thumbs" (n,) data-URI or ""}``. Thumbnails ride in ``customdata`` so the
    page can show the image under the pointer."""
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p["title"] for p in panels],
                        horizontal_spacing=0.06)
    names = sorted({g for p in panels for g in p["groups"]})
    colour = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(names)}
    for k, p in enumerate(panels):
        groups = np.asarray(p["groups"])
        for g in names:
            sel = np.flatnonzero(groups == g)
            if not len(sel):
                continue
            fig.add_trace(go.Scatter(
                x=p["xy"][sel, 0], y=p["xy"][sel, 1], mode="markers", name=g, legendgroup=g,
                showlegend=k == 0, marker=dict(size=8, color=colour[g], line=dict(width=0.5, color="white")),
                customdata=np.stack([np.asarray(p["thumbs"])[sel], np.asarray(p["hover"])[sel]], -1),
                hovertemplate="%{customdata[1]}<extra></extra>"), row=1, col=k + 1)
        fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, row=1, col=k + 1)
        fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, row=1, col=k + 1)
    return _layout(fig, title, height=520)


def learning_curve(curve: dict, *, title: str, x_label: str, acc_label: str, loss_label: str) -> go.Figure:
    """A classroom model's training record: validation accuracy and training loss."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=curve["images"], y=curve["val_acc"], name=acc_label, mode="lines+markers",
                             line=dict(color="#4C78A8")), secondary_y=False)
    fig.add_trace(go.Scatter(x=curve["images"], y=curve["train_loss"], name=loss_label, mode="lines",
                             line=dict(color="#F58518", dash="dot")), secondary_y=True)
    fig.update_xaxes(title=x_label, gridcolor="#eee")
    fig.update_yaxes(title=acc_label, range=[0, 1], secondary_y=False, gridcolor="#eee")
    fig.update_yaxes(title=loss_label, secondary_y=True, showgrid=False)
    return _layout(fig, title, height=340)


def token_cost_plot(strides: np.ndarray, tokens: np.ndarray, cost: np.ndarray, current: int, *,
                    title: str, x_label: str, tokens_label: str, cost_label: str) -> go.Figure:
    """Tokens and relative attention cost (N²) against stride, for a fixed kernel (log scale, on a
    second y axis at the right)."""
    data = [dict(type="bar", x=strides, y=tokens, name=tokens_label, xaxis="x", yaxis="y",
                 marker=dict(color=["#E45756" if s == current else "#4C78A8" for s in strides])),
            dict(type="scatter", x=strides, y=cost, name=cost_label, mode="lines+markers", xaxis="x", yaxis="y2",
                 line=dict(color="#F58518"))]
    return _figure(data, title, 340,
                   xaxis=dict(anchor="y", domain=[0.0, 0.94], title=dict(text=x_label), dtick=1),
                   yaxis=dict(anchor="x", domain=[0.0, 1.0], title=dict(text=tokens_label), gridcolor="#eee"),
                   yaxis2=dict(anchor="x", overlaying="y", side="right", title=dict(text=cost_label), type="log",
                               showgrid=False),
                   # inside the plot's empty top right: beside it, it covered the right axis title
                   legend=dict(x=0.92, xanchor="right", y=0.98, bgcolor="rgba(255,255,255,0.85)"))
