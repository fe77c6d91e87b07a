"""Renderers: numpy in, RGB uint8 (or a figure) out, in the right place and colour order."""
from __future__ import annotations

import numpy as np
import pytest

from explorer.render import overlay as ov

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(h=90, w=120, seed=0):
    return np.random.default_rng(seed).integers(30, 226, (h, w, 3), dtype=np.uint8)


def test_colormap_lut_is_rgb():
    lut = ov.colormap_lut("inferno")
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    r, g, b = lut[255].astype(int)
    assert r > 200 and g > 200 and b < 190  # inferno ends pale yellow
    assert r > b + 60 and g > b + 60
    assert lut[0].max() < 20  # and starts near black
    assert lut[128, 0] > lut[128, 2]  # the middle is red-purple, red above blue
    jet = ov.colormap_lut("jet")
    assert jet[0, 2] > 100 and jet[0, 0] < 10  # jet starts blue (in RGB order)
    assert jet[255, 0] > 100 and jet[255, 2] < 10  # and ends red
    assert ov.colormap_lut("inferno") is lut  # cached


def test_normalise():
    np.testing.assert_allclose(ov.normalise(np.array([[2.0, 4.0], [6.0, 10.0]])), [[0, 0.25], [0.5, 1]])
    assert not ov.normalise(np.full((3, 3), 7.0)).any()
    stack = np.stack([np.array([[2.0, 4.0], [6.0, 10.0]]), np.full((2, 2), 7.0), -np.arange(4.0).reshape(2, 2)])
    each = ov.normalise(stack, axis=(1, 2))  # a stack of maps: each on its own
    np.testing.assert_array_equal(each, np.stack([ov.normalise(m) for m in stack]))
    np.testing.assert_allclose(each[2], [[1, 2 / 3], [1 / 3, 0]], rtol=1e-6)


def test_heatmap_orientation_and_size():
    m = np.zeros((4, 6))
    m[0, 5] = 1.0  # top right is the peak
    hm = ov.heatmap(m, (60, 40), smooth=False)  # size is (width, height)
    assert hm.shape == (40, 60, 3) and hm.dtype == np.uint8
    lut = ov.colormap_lut("inferno")
    np.testing.assert_array_equal(hm[2, 57], lut[255])
    np.testing.assert_array_equal(hm[37, 2], lut[0])


def test_overlay_without_box():
    img = _image()
    m = np.random.default_rng(1).random((4, 4))
    out = ov.overlay(img, m, alpha=0.5)
    assert out.shape == img.shape and out.dtype == np.uint8
    hm = ov.heatmap(m, (120, 90))
    expected = np.round(0.5 * img.astype(float) + 0.5 * hm.astype(float))
    assert np.abs(out.astype(float) - expected).max() <= 1
    assert out is not img and not np.shares_memory(out, img)


def test_overlay_with_box_dims_outside():
    img = _image(100, 150)
    box = (25.0, 10.0, 125.0, 90.0)
    m = np.random.default_rng(2).random((5, 5))
    out = ov.overlay(img, m, box=box, alpha=0.6, dim_outside=0.35)
    assert out.shape == (100, 150, 3) and out.dtype == np.uint8
    outside = np.ones((100, 150), bool)
    outside[10:90, 25:125] = False
    dimmed = np.round(img.astype(float) * 0.35)
    assert np.abs(out[outside].astype(float) - dimmed[outside]).max() <= 1
    assert out[outside].mean() < img[outside].mean() * 0.4
    inside = out[10:90, 25:125].astype(float)
    hm = ov.heatmap(m, (100, 80)).astype(float)
    expected = 0.4 * img[10:90, 25:125].astype(float) + 0.6 * hm
    assert np.abs(inside - expected).max() <= 1



@pytest.mark.parametrize("workers", [1, 2, 3])
def test_overlay_in_bands_and_threads_equals_one_pass(monkeypatch, workers):
    """Rows are blended a band at a time (and, on big images, bands on several threads): the
    result is pixel for pixel the whole-image formula, whatever the band and thread split.
    Inside the box a pixel is round(0.45 · pixel) + round(0.55 · colour), outside round(0.35 · pixel)."""
    img = _image(203, 171, seed=9)
    box = (20.4, 13.0, 151.6, 188.0)  # crosses band and thread boundaries on every side
    m = np.random.default_rng(5).random((6, 6))
    x0, y0, x1, y1 = 20, 13, 152, 188
    f32 = img.astype(np.float32)
    ref = np.rint(f32 * np.float32(0.35))
    colour = ov.colormap_lut()[ov._scaled_values(m, (x1 - x0, y1 - y0), True)].astype(np.float64)
    ref[y0:y1, x0:x1] = np.minimum(255, np.rint(f32[y0:y1, x0:x1] * np.float32(0.45)) + np.rint(colour * 0.55))
    monkeypatch.setattr(ov, "_BAND_PIXELS", 132 * 7)  # 7 rows a band
    monkeypatch.setattr(ov, "_PARALLEL_PIXELS", 1 if workers > 1 else 10**9)
    monkeypatch.setattr(ov, "_workers", lambda pixels: workers)
    out = ov.overlay(img, m, box=box, alpha=0.55)
    np.testing.assert_array_equal(out, ref.astype(np.uint8))
    hm = ov.heatmap(m, (x1 - x0, y1 - y0)).astype(float)  # and within 1 of the exact blend
    assert np.abs(out[y0:y1, x0:x1] - (0.45 * img[y0:y1, x0:x1] + 0.55 * hm)).max() <= 1


@pytest.mark.parametrize("box", [None, (20.4, 13.0, 151.6, 188.0), (0.0, 40.0, 171.0, 120.0)])
def test_overlays_of_several_maps_equal_one_at_a_time(monkeypatch, box):
    """Several maps over one image in one pass (the image's scaled and dimmed pixels shared):
    each overlay is the one :func:`overlay` makes alone, and none shares memory with another."""
    img = _image(203, 171, seed=3)
    maps = [np.random.default_rng(s).random((6, 6)) for s in range(3)]
    monkeypatch.setattr(ov, "_BAND_PIXELS", 171 * 5)
    monkeypatch.setattr(ov, "_workers", lambda pixels: 2)
    alone = [ov.overlay(img, m, box=box, alpha=0.4).copy() for m in maps]
    together = ov.overlays(img, maps, box=box, alpha=0.4)
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)
    assert not np.shares_memory(together[0], together[1]) and not np.shares_memory(together[1], together[2])
    assert ov.overlays(img, [], box=box) == []

def test_overlay_alpha_extremes():
    img = _image(40, 40)
    m = np.random.default_rng(3).random((2, 2))
    np.testing.assert_array_equal(ov.overlay(img, m, alpha=0.0), img)
    np.testing.assert_array_equal(ov.overlay(img, m, alpha=1.0), ov.heatmap(m, (40, 40)))
    # an opacity outside 0..1 is held to it (1 - alpha would otherwise scale the image by a negative)
    np.testing.assert_array_equal(ov.overlay(img, m, alpha=1.7), ov.heatmap(m, (40, 40)))
    np.testing.assert_array_equal(ov.overlay(img, m, alpha=-0.2), img)


def test_overlay_with_explanation_box(vit_model):
    import explorer
    from explorer.analysis import patch_map, rollout_row

    img = _image(70, 130, seed=4)
    e = explorer.explain(vit_model, img)
    row = rollout_row(e.attention, e.layout.default_query(), num_prefix=e.layout.num_prefix)
    out = ov.overlay(img, patch_map(row, e.layout.num_prefix, e.layout.grid), box=e.box)
    assert out.shape == img.shape and out.dtype == np.uint8
    x0 = int(round(e.box[0]))
    assert x0 > 0
    left = out[:, : x0 - 1].astype(float) - img[:, : x0 - 1].astype(float) * 0.35
    assert np.abs(left).max() <= 1  # dimmed, not covered


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_patch_grid(grid):
    img = np.zeros((120, 200, 3), np.uint8)
    out = ov.patch_grid(img, grid, first_index=1, highlight=2)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert not img.any()  # input untouched
    rows, cols = grid
    y = round(120 / rows)  # the first horizontal line
    assert out[y, 5:195].mean() > 100
    x = round(200 / cols)
    assert out[5:115, x].mean() > 100
    # highlighted patch 2 is outlined in cyan (0, 255, 255) in RGB
    r, c = divmod(2, cols)
    cw, ch = 200 / cols, 120 / rows
    edge = out[int(r * ch) + 1, int(c * cw) + int(cw // 2)]
    assert edge[1] > 200 and edge[2] > 200 and edge[0] < 60


def test_mark_patch_and_mask_outline():
    img = np.zeros((100, 100, 3), np.uint8)
    out = ov.mark_patch(img, (4, 4), 5, box=(10, 10, 90, 90))
    assert out.shape == img.shape and out[30, 50].tolist() != [0, 0, 0]  # patch (1, 1) top edge y=30
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True
    out = ov.mask_outline(img, mask, box=(0, 0, 100, 100))
    assert out.shape == img.shape and out[..., 1].max() > 0 and out[50, 50].tolist() == [0, 0, 0]


def test_upscale_nearest():
    img = _image(64, 48)
    big = ov.upscale_nearest(img, 384)
    assert big.shape == (64 * 8, 48 * 8, 3)
    np.testing.assert_array_equal(big[::8, ::8], img)
    assert ov.upscale_nearest(_image(400, 500)).shape == (400, 500, 3)


@pytest.mark.parametrize("shape,size,pad", [((2, 3, 4, 4), 20, 2), ((3, 2, 14, 14), 72, 2),
                                            ((2, 2, 37, 30), 72, 3), ((1, 2, 9, 7), 13, 0)])
def test_tile_maps_shape_and_content(shape, size, pad):
    """Every tile is the heatmap of its own map drawn alone (nearest-neighbour, each normalised;
    a constant map is all level 0), and the padding between tiles is white."""
    maps = np.random.default_rng(0).random(shape)
    maps[0, -1] = 0.25
    out = ov.tile_maps(maps, size=size, pad=pad)
    R, C = shape[:2]
    step = size + pad
    assert out.shape == (R * step + pad, C * step + pad, 3) and out.dtype == np.uint8
    covered = np.zeros(out.shape[:2], bool)
    for i in range(R):
        for j in range(C):
            y, x = pad + i * step, pad + j * step
            np.testing.assert_array_equal(out[y:y + size, x:x + size],
                                          ov.heatmap(maps[i, j], (size, size), smooth=False), err_msg=f"{i},{j}")
            covered[y:y + size, x:x + size] = True
    assert (out[~covered] == 255).all()  # padding is white
    x = pad + (C - 1) * step  # the constant map's tile: level 0 everywhere
    assert (out[pad:pad + size, x:x + size] == ov.colormap_lut()[0]).all()


@pytest.mark.parametrize("words", [4, 8])
def test_word_panels_show_the_patch_and_each_words_share(words):
    """TNT's inner view: the patch's pixels (left) and the shares coloured from 0 to the largest
    (right), read at a corner of every word's cell, where neither grid lines nor labels are drawn."""
    rng = np.random.default_rng(3)
    patch = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    shares = rng.random((words, words)) + 0.1
    shares /= shares.sum()
    size, gap = 220, 12
    img = ov.word_panels(patch, shares, size=size, gap=gap)
    assert img.shape == (size, 2 * size + gap, 3) and img.dtype == np.uint8
    assert (img[:, size:size + gap] == 255).all()
    lut = ov.colormap_lut("inferno")
    level = np.round(shares / shares.max() * 255).astype(int)
    cell = size / words
    px = 16 / size
    labelled = 0
    for r in range(words):
        for c in range(words):
            y, x = int(r * cell + 4), int(c * cell + 4)  # inside the cell, off the lines and the label
            assert (img[y, x] == patch[int(y * px), int(x * px)]).all()
            assert (img[y, size + gap + x] == lut[level[r, c]]).all(), (r, c)
            centre = img[int((r + 0.5) * cell), size + gap + int(c * cell + 3):size + gap + int((c + 1) * cell - 3)]
            labelled += not (centre == lut[level[r, c]]).all(-1).all()
    # 4×4 words (55-px cells) carry their share as text; 8×8 (27-px cells) are too small for it
    assert labelled == (words * words if words == 4 else 0)


def test_word_panels_keep_equal_shares_equal_and_the_patch_shape():
    """Equal shares are one colour, the brightest (colours run from 0, not from the smallest
    share); a 16×8 patch keeps its shape; a NaN share is drawn as 0 instead of blackening all."""
    lut = ov.colormap_lut("inferno")
    patch = np.random.default_rng(4).integers(0, 256, (16, 8, 3), dtype=np.uint8)
    img = ov.word_panels(patch, np.full((4, 2), 1 / 8), size=200, gap=10)
    assert img.shape == (200, 2 * 100 + 10, 3)
    right = img[:, 110:]
    for r in range(4):
        for c in range(2):
            assert (right[r * 50 + 3, c * 50 + 3] == lut[255]).all()
    shares = np.full((4, 4), 1 / 16)
    shares[0, 0] = np.nan
    img = ov.word_panels(np.zeros((16, 16, 3), np.uint8), shares, size=220, gap=12)
    assert (img[3, 232 + 3] == lut[0]).all() and (img[3, 232 + 58] == lut[255]).all()


def test_figure_tile_with_nan_gaps():
    from explorer.render.figures import tile

    stack = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    t = tile(stack)
    assert t.shape == (2 * 5 - 1, 3 * 6 - 1)
    np.testing.assert_array_equal(t[5:9, 12:17], stack[1, 2])
    assert np.isnan(t[4]).all() and np.isnan(t[:, 5]).all()


def test_layer_head_grid_figure():
    from explorer.render.figures import layer_head_grid

    maps = np.random.default_rng(0).random((2, 3, 4, 4)).astype(np.float32)
    fig = layer_head_grid(maps, title="t", layer_label="layer", head_label="head", value_label="w")
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (2 * 5 - 1, 3 * 5 - 1)
    np.testing.assert_allclose(z[5:9, 10:14], maps[1, 2] / maps[1, 2].max(), rtol=1e-6)
    custom = np.asarray(fig.data[0].customdata, dtype=float)
    np.testing.assert_allclose(custom[5:9, 10:14, 1], maps[1, 2], rtol=1e-6)  # raw weights
    np.testing.assert_array_equal(custom[5:9, 10:14, 0], np.arange(16).reshape(4, 4))  # token index (no prefix)
    assert (custom[4, :, 0] == -1).all() and np.isnan(z[4]).all()  # the gap row
    # the hover names a cell by its categories: layer and row (y), head and column (x), counted from 1
    assert fig.data[0].y[7] == "layer 2 · row 3" and fig.data[0].x[13] == "head 3 · col 4"
    assert len(set(fig.data[0].x)) == z.shape[1] and len(set(fig.data[0].y)) == z.shape[0]
    assert fig.layout.xaxis.type == "category" and list(fig.layout.xaxis.ticktext) == ["head 1", "head 2", "head 3"]
    assert list(fig.layout.yaxis.ticktext) == ["layer 1", "layer 2"]
    # with a class token first, the hover names the sequence position the query box takes
    shifted = layer_head_grid(maps, title="t", layer_label="layer", head_label="head", value_label="w",
                              first_token=1)
    np.testing.assert_array_equal(np.asarray(shifted.data[0].customdata, dtype=float)[5:9, 10:14, 0],
                                  1 + np.arange(16).reshape(4, 4))


def _figure_cases():
    from explorer.render import figures as F

    rng = np.random.default_rng(3)
    sim = rng.uniform(-1, 1, (4, 5, 4, 5)).astype(np.float32)
    return {
        "layer_head_grid": lambda: F.layer_head_grid(rng.random((2, 3, 4, 4)).astype(np.float32), title="t",
                                                     layer_label="层", head_label="头", value_label="w"),
        "similarity_panels": lambda: F.similarity_panels([("learned", sim), ("1D", sim)], title="t"),
        "similarity_panels_stretched": lambda: F.similarity_panels([("learned", sim), ("1D", sim * 0.3 + 0.6)],
                                                                   title="t", stretch=(1,)),
        "small_heatmaps": lambda: F.small_heatmaps([(str(i), rng.uniform(-1, 1, (4, 4))) for i in range(16)],
                                                   title="t"),
        "distance_plot": lambda: F.distance_plot(rng.random((3, 4)) * 90, np.array([3.0, 5, 7]),
                                                 np.array([1.0, 1.6, 2.1]), 74.7, title="t", x_label="x",
                                                 y_label="y", head_label="h", rf_label="rf",
                                                 conv_mad_label="c", uniform_label="u"),
        "token_cost_plot": lambda: F.token_cost_plot(np.arange(4, 17), 224 // np.arange(4, 17) ** 2 + 1,
                                                     np.linspace(1, 9, 13), 16, title="t", x_label="x",
                                                     tokens_label="n", cost_label="c"),
    }


@pytest.mark.parametrize("name", sorted(_figure_cases()))
def test_unvalidated_figures_equal_validated_ones(monkeypatch, name):
    """The app builds figures without Plotly's property validation (8-13 ms a figure): each is
    valid (building it with validation raises nothing) and sends the browser the same JSON."""
    import json

    from explorer.render import figures as F

    import plotly.io as pio

    monkeypatch.setattr(F, "VALIDATE", True)
    checked = json.loads(pio.to_json(_figure_cases()[name]()))  # the same random data each time
    monkeypatch.setattr(F, "VALIDATE", False)
    fast = json.loads(pio.to_json(_figure_cases()[name]()))
    assert fast == checked
    assert not any(isinstance(trace.get("colorscale"), str) for trace in fast["data"])  # resolved


@pytest.mark.parametrize("name", sorted(_figure_cases()))
def test_figure_json_parses_to_plotlys_and_stays_safe_in_html(name):
    """Figure.to_json (what Gradio's Plot sends) parses to exactly what Plotly's own writer gives,
    escapes what could end an HTML script, leaves the figure's arrays as they were, and is what
    the app's Plot component sends."""
    import json

    import plotly.io as pio

    fig = _figure_cases()[name]()
    arrays = {i: {k: v.copy() for k, v in t.items() if isinstance(v, np.ndarray)} for i, t in enumerate(fig._data)}
    ours = fig.to_json()
    assert json.loads(ours) == json.loads(pio.to_json(fig))
    assert not any(c in ours for c in "<>\u2028\u2029")
    for i, kept in arrays.items():
        for k, v in kept.items():
            assert isinstance(fig._data[i][k], np.ndarray)
            np.testing.assert_array_equal(fig._data[i][k], v)
    import gradio as gr
    assert gr.Plot().postprocess(fig).plot == ours


def test_figure_json_escapes_a_script_end_in_a_label():
    import json

    from explorer.render import figures as F

    fig = F.layer_head_grid(np.ones((1, 2, 2, 2), np.float32), title="</script><b>", layer_label="\u2028",
                            head_label="h", value_label="w")
    out = fig.to_json()
    assert "</script>" not in out and "\u2028" not in out and "\\u003c/script\\u003e" in out
    assert json.loads(out)["layout"]["title"]["text"] == "</script><b>"


def test_figure_json_falls_back_to_plotlys_writer_when_it_must():
    """A label that looks like the writer's own placeholder for an array, and an array orjson
    cannot write (objects), both go through Plotly's writer and still give its JSON."""
    import json

    import plotly.io as pio

    from explorer.render import figures as F

    odd = F.layer_head_grid(np.ones((1, 2, 2, 2), np.float32), title="\x010\x01 \\u00010\\u0001",
                            layer_label="l", head_label="h", value_label="w")
    objects = F._figure([dict(type="scatter", x=np.arange(2), y=np.array(["a", None], dtype=object))], "t", 300)
    for fig in (odd, objects):
        assert json.loads(fig.to_json()) == json.loads(pio.to_json(fig))
    assert json.loads(odd.to_json())["layout"]["title"]["text"] == "\x010\x01 \\u00010\\u0001"


def test_marks_drawn_in_place_equal_the_copies():
    """``copy=False`` draws on the overlay itself (no 12-MP copy) and gives the same pixels."""
    img = _image(90, 120, seed=4)
    mask = np.zeros((60, 60), bool)
    mask[10:40, 20:50] = True
    box = (30.0, 15.0, 90.0, 75.0)
    ref = ov.mask_outline(ov.mark_patch(img, (4, 4), 5, box=box), mask, box=box)
    work = img.copy()
    out = ov.mask_outline(ov.mark_patch(work, (4, 4), 5, box=box, copy=False), mask, box=box, copy=False)
    assert out is work
    np.testing.assert_array_equal(out, ref)
    assert not np.array_equal(ref, img)


def test_full_size_overlays_recycle_only_buffers_nobody_holds():
    """Overlays from 1 MB come from a pool: one still held (or a view of it) is never written
    again, one let go is reused, and every overlay equals a fresh one."""
    img = np.random.default_rng(1).integers(0, 256, (700, 900, 3), dtype=np.uint8)  # 1.9 MB
    maps = [np.random.default_rng(s).random((7, 9)) for s in range(3)]
    fresh = [ov.overlay(img, m).copy() for m in maps]
    first = ov.overlay(img, maps[0])
    corner = first[:10, :10]  # a view keeps the buffer taken
    address = first.__array_interface__["data"][0]
    del first
    second = ov.overlay(img, maps[1])
    assert second.__array_interface__["data"][0] != address
    np.testing.assert_array_equal(corner, fresh[0][:10, :10])
    del corner, second
    third = ov.overlay(img, maps[2])
    assert third.__array_interface__["data"][0] == address  # the let-go buffer, no fresh pages
    assert any(np.shares_memory(third, kept) for kept in ov.OVERLAYS._arrays)
    np.testing.assert_array_equal(third, fresh[2])


def test_export_writes_every_overlay_the_viewer_would_draw(vit_model):
    """The exported files: the rollout and each layer's head-mean map as overlays over the whole
    image (made two at a time), each the overlay drawn alone, in the order a folder lists them."""
    import io

    from PIL import Image

    import explorer
    from explorer import analysis, export

    img = _image(70, 130, seed=6)
    e = explorer.explain(vit_model, img)
    opts = analysis.RolloutOptions()
    q = e.layout.default_query()
    files = export.artefacts(e, img, opts, q, "tiny")
    names = list(files)
    assert names[:3] == ["rollout.png", "patches.png", "layers_heads.png"]
    assert names[3:3 + e.num_layers] == [f"layer{i + 1:02d}.png" for i in range(e.num_layers)]
    maps = analysis.query_maps(e.attention, q, e.layout)
    expected = {"rollout.png": analysis.patch_map(e.rollout_row(q, opts), e.layout.num_prefix, e.layout.grid)}
    expected.update({f"layer{i + 1:02d}.png": maps[i].mean(0) for i in range(e.num_layers)})
    for name, m in expected.items():
        got = np.asarray(Image.open(io.BytesIO(files[name])))
        np.testing.assert_array_equal(got, ov.overlay(img, m, box=e.box), err_msg=name)


def test_export_arrays_hold_what_the_views_show_and_the_summary_names_them(vit_model, tnt_model):
    """arrays.npz holds the attention, token states, logits (a backbone's pooled features, named
    so), the rollout row, the mean attention distance of the receptive-field view (recomputed
    here from the attention by the paper's formula) and, for TNT, the inner attention with its
    word grid; summary.json names each with its shape and says how layer axes count."""
    import io
    import json

    import explorer
    from conftest import build
    from explorer import analysis, export

    img = _image(70, 130, seed=7)
    for model in (vit_model, tnt_model, build("dinov2")):
        e = explorer.explain(model, img)
        opts = analysis.RolloutOptions()
        q = e.layout.default_query()
        files = export.artefacts(e, img, opts, q, "tiny")
        arrays = np.load(io.BytesIO(files["arrays.npz"]))
        summary = json.loads(files["summary.json"])
        assert "first block" in summary["layer_axes"]
        assert set(arrays.files) == set(summary["arrays"])
        for name in arrays.files:
            assert summary["arrays"][name]["shape"] == list(arrays[name].shape) and summary["arrays"][name]["meaning"]
        out = "logits" if e.topk else "features"  # the backbone has no classifier, hence no prediction
        assert out in arrays.files and ({"logits", "features"} - {out}).isdisjoint(arrays.files)
        np.testing.assert_array_equal(arrays[out], e.logits)
        assert (summary["prediction"] == []) == (out == "features")
        np.testing.assert_array_equal(arrays["attention"], e.attention)
        np.testing.assert_array_equal(arrays["rollout"], e.rollout_row(q, opts))
        # Σ_k a_qk·d_qk over patch keys, renormalised over them, averaged over patch queries
        lay = e.layout
        p = lay.num_prefix
        a = e.attention[:, :, p:, p:].astype(np.float64)
        rows, cols = np.divmod(np.arange(lay.num_patches), lay.grid[1])
        ph, pw = lay.patch_size
        d = np.hypot((rows[:, None] - rows[None]) * ph, (cols[:, None] - cols[None]) * pw)
        mad = ((a * d).sum(-1) / a.sum(-1)).mean(-1)
        np.testing.assert_allclose(arrays["attention_distance"], mad, rtol=1e-5)
        if e.inner_attention is None:
            assert "inner_attention" not in arrays.files and "word_grid" not in summary["layout"]
        else:
            np.testing.assert_array_equal(arrays["inner_attention"], e.inner_attention)
            rows, cols = summary["layout"]["word_grid"]
            assert rows * cols == e.inner_attention.shape[-1] and rows == cols  # square patches


def test_similarity_panels_stretch_colours_but_hover_the_true_cosine():
    """Each panel is its own trace holding its true cosines. A stretched panel (the sine-cosine
    references) is coloured from its own minimum to its maximum and named with that range; the
    others on -1 to 1, with the one colour bar. Panels sit side by side with a gap."""
    from explorer.render.figures import similarity_panels

    rng = np.random.default_rng(5)
    learned = rng.uniform(-1, 1, (3, 4, 3, 4)).astype(np.float32)
    ref = rng.uniform(0.5, 0.9, (3, 4, 3, 4)).astype(np.float32)
    fig = similarity_panels([("learned", learned), ("1D", ref)], title="t", stretch=(1,),
                            stretch_label="from {lo:.2f} to {hi:.2f}")
    a, b = fig.data
    za, zb = np.asarray(a.z, dtype=float), np.asarray(b.z, dtype=float)
    np.testing.assert_allclose(za[:3, :4], learned[0, 0], rtol=1e-6)  # tile of position (0, 0)
    np.testing.assert_allclose(zb[4:7, 5:9], ref[1, 1], rtol=1e-6)  # tile of position (1, 1)
    assert (a.zmin, a.zmax) == (-1, 1) and a.showscale and not b.showscale
    lo, hi = float(np.nanmin(zb)), float(np.nanmax(zb))
    assert (b.zmin, b.zmax) == pytest.approx((lo, hi)) and 0.5 <= lo < hi <= 0.9
    assert b.x0 == a.x0 + za.shape[1] + 3  # after the first panel and a gap
    assert list(fig.layout.xaxis.ticktext) == ["learned<br><sub> </sub>", f"1D<br><sub>from {lo:.2f} to {hi:.2f}</sub>"]
    np.testing.assert_array_equal(np.asarray(b.customdata)[4, 5], [2, 2])  # row 2, col 2, counted from 1
