"""Every public endpoint of the running app through gradio_client, checked against independent
computations in this process (the bundled classroom models, no network)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _app import app_url, real_assets  # noqa: F401  (fixtures)

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples" / "shapes"
CONTROLS = dict(fusion="mean", discard=0.0, start_layer=1, opacity=0.55, show_mask=True, inner_layer=1)
# /explain and /load_model return the views in this order
VIEWS = ["overlay", "caption", "layer_head", "inner_img", "inner_md", "query", "grid_img", "pipeline", "conv_note",
         "overlap", "cost", "pos_plot", "pos_md", "pixel_plot", "mad_plot", "mad_md", "pred", "notes", "start_layer",
         "inner_layer", "tsne_layer"]
ATTN = VIEWS[:6]


def example(name: str = "star") -> Path:
    return sorted((EXAMPLES / name).glob(f"{name}_*[0-9].png"))[0]


class Trace(dict):
    """One plotly trace with its arrays decoded (plotly sends them as base64 typed arrays)."""

    def __getattr__(self, key):
        return arr(self.get(key))


def arr(v):
    if isinstance(v, dict) and "bdata" in v:
        import base64

        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        shape = v.get("shape")
        if shape:
            a = a.reshape([int(n) for n in str(shape).split(",")])
        return a
    if isinstance(v, list):
        return np.array([arr(x) for x in v]) if v and isinstance(v[0], dict) else np.array(v, dtype=object) \
            if v and isinstance(v[0], (list, str)) else np.array(v)
    return v


def plot_data(value) -> list:
    return [Trace(d) for d in json.loads(value["plot"])["data"]]


def all_text(out) -> str:
    """Every string in an endpoint's outputs, including those inside component updates."""
    if isinstance(out, str):
        return out
    if isinstance(out, dict):
        return " ".join(all_text(v) for v in out.values())
    if isinstance(out, (list, tuple)):
        return " ".join(all_text(v) for v in out)
    return ""


def naive_rollout_row(attention: np.ndarray, query: int) -> np.ndarray:
    """Abnar & Zuidema with explicit matrices: R = Â_L … Â_1, Â = 0.5·mean_h(A) + 0.5·I, rows renormalised."""
    T = attention.shape[-1]
    R = np.eye(T)
    for layer in range(attention.shape[0]):
        A = 0.5 * attention[layer].astype(np.float64).mean(0) + 0.5 * np.eye(T)
        A /= A.sum(-1, keepdims=True)
        R = A @ R
    return R[query]


@pytest.fixture(scope="module")
def client(app_url):  # noqa: F811
    return Client(app_url, verbose=False)


@pytest.fixture(autouse=True)
def _assets(real_assets):  # noqa: F811
    yield


def explain(client, path, lang="en", **ctl):
    c = {**CONTROLS, **ctl}
    out = client.predict(handle_file(str(path)), lang, c["fusion"], c["discard"], c["start_layer"], c["opacity"],
                         c["show_mask"], c["inner_layer"], 8, 8, api_name="/explain")
    return dict(zip(VIEWS, out))


def test_explain_matches_an_independent_computation(client):
    from explorer import explain as explain_py, load_model
    from explorer.app.views import object_patches
    from explorer.images import decode

    path = example("star")
    v = explain(client, path)
    overlay = np.asarray(Image.open(v["overlay"]))
    assert overlay.shape == (448, 448, 3)  # the 64-px scene, enlarged for the projector

    model = load_model("classroom-vit")
    img = decode(path.read_bytes()).array
    exp = explain_py(model, img)
    # prediction: same top-5 labels and probabilities as the library computes here
    conf = {c["label"]: c["confidence"] for c in v["pred"]["confidences"]}
    for idx, label, p in exp.topk:
        assert conf[label] == pytest.approx(p, abs=1e-4)
    # the caption's share of rollout on the object, from a naive rollout written from the paper
    row = naive_rollout_row(exp.attention, 0)
    pmap = row[exp.layout.num_prefix:].reshape(exp.layout.grid)
    mask = decode(path.with_name(path.stem + ".mask.png").read_bytes()).array[..., 0] > 127
    obj = object_patches(mask, exp.box, exp.layout)
    share = pmap[obj].sum() / pmap.sum()
    shown = int(re.search(r"\*\*(\d+)%\*\*", v["caption"]).group(1))
    assert shown == round(100 * share)
    # the layer × head grid: L×H tiles of the model's grid, NaN gaps between them
    z = np.array(plot_data(v["layer_head"])[0].z, dtype=float)
    L, H = exp.num_layers, exp.num_heads
    assert z.shape == (L * 9 - 1, H * 9 - 1)
    assert v["query"] == 0 and v["start_layer"]["maximum"] == L
    # mean attention distance plot: one trace per head with L points
    heads = [d for d in plot_data(v["mad_plot"]) if d.mode == "markers"]
    assert len(heads) == H and all(len(d.y) == L for d in heads)
    from explorer.analysis.distance import mean_attention_distance
    mad = mean_attention_distance(exp.attention, exp.layout)
    np.testing.assert_allclose([d.y for d in heads], mad.T, rtol=1e-5)
    # position embeddings: three panels, learned similarity has a unit diagonal
    # (one trace each, side by side; the sine-cosine panels coloured on their own range, named)
    learned, ref1, ref2 = plot_data(v["pos_plot"])
    names = json.loads(v["pos_plot"]["plot"])["layout"]["xaxis"]["ticktext"]
    assert [n.split("<br>")[0] for n in names] == ["learned (this model)", "1D sine-cosine", "2D sine-cosine"]
    assert f"colours from {ref1.zmin:.2f} to {ref1.zmax:.2f}" in names[1] and ref1.zmax == pytest.approx(1.0)
    z = np.asarray(learned.z, dtype=float)
    assert z.shape[0] == 8 * 9 - 1 and z[0, 0] == pytest.approx(1.0, abs=1e-5)  # position 0 vs itself
    assert (learned.zmin, learned.zmax) == (-1, 1)
    assert "64" in v["pos_md"]
    # patch grid view shows the model's own 8×8 grid and the tensor shapes
    assert "65 × 96" in v["pipeline"].replace("`", "") and "kernel_size=(8, 8), stride=(8, 8)" in v["conv_note"]


def test_controls_and_queries_answer_from_the_cache(client):
    from explorer import explain as explain_py, load_model
    from explorer.images import decode

    path = example("cross")
    explain(client, path)
    exp = explain_py(load_model("classroom-vit"), decode(path.read_bytes()).array)
    # a slider answers with the overlay, its caption and the TNT inner view; the grid stays
    out = dict(zip(["overlay", "caption", "inner_img", "inner_md"],
                   client.predict("en", "max", 0.5, 3, 0.7, False, 1, api_name="/attention")))
    assert "class token" in out["caption"]
    assert "Share of rollout" in out["caption"]  # the mask is known even when its outline is hidden
    # its share, with max fusion, half the links discarded and the first two layers left out (the
    # slider counts layers from 1: start at layer 3, block index 2),
    # recomputed from the full matrix chain (discarding by selection, not by the kept ranks)
    from explorer.analysis import RolloutOptions, rollout_matrix
    from explorer.app.views import object_patches
    lay = exp.layout
    full = rollout_matrix(exp.attention, RolloutOptions(head_fusion="max", discard_ratio=0.5, start_layer=2),
                          lay.num_prefix)[lay.default_query()]
    pmap = full[lay.num_prefix:].reshape(lay.grid)
    mask = decode(path.with_name(path.stem + ".mask.png").read_bytes()).array[..., 0] > 127
    obj = object_patches(mask, exp.box, lay)
    assert int(re.search(r"\*\*(\d+)%\*\*", out["caption"]).group(1)) == round(100 * pmap[obj].sum() / pmap.sum())
    token = exp.layout.token_of_patch(3, 4)
    out = dict(zip(ATTN, client.predict(token, "en", "mean", 0.0, 1, 0.55, True, 1, api_name="/set_query")))
    assert out["query"] == token
    assert "token 29 (the patch in row 4, column 5)" in out["caption"]  # rows and columns counted from 1
    z = np.asarray(plot_data(out["layer_head"])[0].customdata, dtype=float)[..., 1]  # raw weights in hover data
    top_left = z[:8, :8]  # layer 1, head 1
    np.testing.assert_allclose(top_left, exp.attention[0, 0, token, 1:].reshape(8, 8), atol=1e-4)
    out = dict(zip(ATTN, client.predict("en", "mean", 0.0, 1, 0.55, True, 1, api_name="/reset_query")))
    assert out["query"] == 0
    with pytest.raises(AppError, match="outside"):
        client.predict(999, "en", "mean", 0.0, 1, 0.55, True, 1, api_name="/set_query")


def test_patches_overlap_calculator(client):
    explain(client, example("ring"))
    grid, pipe, fig, text = client.predict("en", 16, 8, api_name="/patches")
    # 64-px image, kernel 16, stride 8: (64-16)/8+1 = 7 per side -> 49 tokens; stride 16 -> 16 tokens
    assert "7×7 = 49 tokens" in text
    assert f"{(49 ** 2) / (16 ** 2):.1f}×" in text
    bars = plot_data(fig)[0]
    assert list(bars.y) == [((64 - 16) // s + 1) ** 2 for s in range(1, 17)]
    # the paper's numbers, on a 224-px image: 224/16 = 14, 14×14 = 196 patches of 16·16·3 = 768
    # values; stride 8: (224 - 16)/8 + 1 = 27 per side, 729 tokens, (729/196)² ≈ 13.8× the cost
    _, _, _, text = client.predict("en", 16, 16, "224", api_name="/patches")
    assert "224×224 image: **14×14 = 196 tokens** (768 values each)" in text and "**1.0×**" in text
    _, _, fig, text = client.predict("en", 16, 8, "224", api_name="/patches")
    assert "**27×27 = 729 tokens**" in text and f"**{729 ** 2 / 196 ** 2:.1f}×**" in text
    assert list(plot_data(fig)[0].y) == [((224 - 16) // s + 1) ** 2 for s in range(1, 17)]
    with pytest.raises(AppError):  # not one of the choices
        client.predict("en", 16, 8, "100000", api_name="/patches")


def test_language_switch_translates_everything(client):
    explain(client, example("square"))
    out = client.predict("zh-CN", "mean", 0.0, 1, 0.55, True, 1, 8, 8, api_name="/set_language")
    texts = all_text(out)
    assert "类别 token" in texts and "图像块" in texts and "怎么看" in texts


def test_new_model_without_an_image_clears_the_old_explanation(client):
    """Loading another model with the image box empty: the views no longer show the previous model's
    explanation (its overlay under the new model's name), and the language switch, which redraws
    the views, does not mix the old explanation with the new model (it failed: TNT has no
    patch_embed)."""
    explain(client, example("square"))
    c = CONTROLS
    out = client.predict("classroom-tnt", None, "", None, "en", c["fusion"], c["discard"], c["start_layer"],
                         c["opacity"], c["show_mask"], 1, 8, 8, api_name="/load_model")
    v = dict(zip(VIEWS, out[6:]))
    assert v["overlay"] is None and v["caption"] == "" and v["layer_head"] is None and not v["pred"]
    texts = all_text(client.predict("zh-CN", "mean", 0.0, 1, 0.55, True, 1, 8, 8, api_name="/set_language"))
    assert "已加载 **classroom-tnt**（内置）" in texts and "圆形、正方形" in texts
    # with an image in the box, loading explains it again with the new model
    out = client.predict("classroom-vit", None, "", handle_file(str(example("square"))), "en", c["fusion"],
                         c["discard"], c["start_layer"], c["opacity"], c["show_mask"], 1, 8, 8,
                         api_name="/load_model")
    v = dict(zip(VIEWS, out[6:]))
    assert v["overlay"] is not None and "class token" in v["caption"]


def test_tsne_side_by_side_with_silhouette(client):
    fig, text = client.predict("bundled", 5, 6, [], "label", True, "en", api_name="/tsne")
    assert "40 images" in text
    data = plot_data(fig)
    panels = json.loads(fig["plot"])["layout"]["annotations"]
    assert len(panels) == 2 and all("silhouette" in a["text"] for a in panels)
    assert sum(len(d.x) for d in data) == 80  # 40 images in each of two panels


def test_tnt_shows_inner_attention(client):
    c = CONTROLS
    out = client.predict("classroom-tnt", None, "", handle_file(str(example("star"))), "en", c["fusion"],
                         c["discard"], c["start_layer"], c["opacity"], c["show_mask"], 1, 8, 8, api_name="/load_model")
    texts = all_text(out)
    assert "inner" in texts.lower() and "4×4" in texts
    v = dict(zip(VIEWS, out[6:]))  # model, kernel, stride, card, curve, status come first
    inner = np.asarray(Image.open(v["inner_img"]))
    assert inner.shape[0] >= 192 and inner.ndim == 3
    # the class token has no patch: the view looks inside the patch its rollout reaches most;
    # classroom-tnt's 8-px patches hold 4×4 words of 2×2 px (TNT-S: 16-px patches, words of 4×4 px)
    from explorer import explain as explain_py, load_model
    from explorer.analysis import RolloutOptions
    from explorer.images import decode

    loaded = load_model("classroom-tnt")
    exp = explain_py(loaded, decode(example("star").read_bytes()).array)
    top = int(np.argmax(exp.rollout_row(0, RolloutOptions())[1:])) + 1
    assert f"inside the patch of token {top}, layer 1:" in v["inner_md"], v["inner_md"]
    assert "each of its 16 words (2×2 pixels each)" in v["inner_md"]
    # the word named as drawing the most, and its share, recomputed from the inner attention:
    # (H_in, words, words) rows, summed over heads and query words, over all of them
    a = exp.inner_attention[0, top - 1].astype(np.float64)
    received = a.sum(axis=(0, 1)) / (a.shape[0] * a.shape[1])
    assert abs(received.sum() - 1) < 1e-5
    r, c = divmod(int(received.argmax()), 4)
    said = re.search(r"the most, ([0-9.]+)%, goes to the word in row (\d+), column (\d+) "
                     r"\(([0-9.]+)% each if all were equal\)", v["inner_md"])
    assert said, v["inner_md"]
    assert abs(float(said[1]) / (100 * received.max()) - 1) < 5e-3  # three significant digits
    assert (int(said[2]), int(said[3])) == (r + 1, c + 1) and float(said[4]) == 6.25
    assert inner.shape[1] == 2 * inner.shape[0] + 12  # the patch's pixels beside the shares, square panels


def test_inner_view_of_a_clicked_patch_and_of_even_shares(tnt_model, tmp_path):
    """Inside a clicked patch, at the last layer: the word named and its share, recomputed from the
    inner attention (summed over heads and query words); when every word gets the same share, the
    caption says so and names no word."""
    import dataclasses

    from explorer.app import handlers as H
    from explorer.app.views import inner_view

    s = H.explain_file(tnt_model, _png_file(tmp_path), "en", "tnt")
    lay = s.exp.layout
    token = lay.num_prefix + lay.num_patches - 2
    s = H.set_query(s, token)
    last = s.exp.num_layers - 1
    _img, md = inner_view(s, "en", last)
    a = s.exp.inner_attention[last, token - lay.num_prefix].astype(np.float64)
    received = a.sum(axis=(0, 1)) / (a.shape[0] * a.shape[1])
    words = received.size
    side = int(round(np.sqrt(words)))
    r, c = divmod(int(received.argmax()), side)
    assert f"inside the patch of token {token}, layer {last + 1}:" in md
    said = re.search(r"the most, ([0-9.e-]+)%, goes to the word in row (\d+), column (\d+) \(([0-9.]+)% each", md)
    assert said, md
    assert abs(float(said[1]) / (100 * received.max()) - 1) < 5e-3
    assert (int(said[2]), int(said[3])) == (r + 1, c + 1)
    assert abs(float(said[4]) - 100 / words) < 5e-3 * 100 / words
    even = dataclasses.replace(s.exp, inner_attention=np.full_like(s.exp.inner_attention, 1 / words))
    _img, md = inner_view(dataclasses.replace(s, exp=even), "en", last)
    assert f"every word gets the same share, {100 / words:.3g}%" in md and "the most" not in md


def test_bad_inputs_get_clear_messages(client, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("<html><body>not an image</body></html>")
    with pytest.raises(AppError, match="not an image"):
        explain(client, fake)
    c = CONTROLS
    out = client.predict("resnet18", None, "", None, "en", c["fusion"], c["discard"], c["start_layer"], c["opacity"],
                         c["show_mask"], 1, 8, 8, api_name="/load_model")
    assert any(isinstance(o, str) and "not a family this explorer supports" in o for o in out)
    # the previous model still works
    v = explain(client, example("circle"))
    assert v["pred"]["label"]


def test_large_photo_is_shown_shrunk_and_clicks_still_find_their_patch(vit_model):
    """A photo wider than DISPLAY_MAX_SIDE is shown area-averaged at that width (a 3200-px photo:
    each shown pixel is the mean of a 2×2 block), the overlay has the shown size, and a click on
    the shown image names the patch under it in the photo's own pixels."""
    from explorer import explain as explain_py
    from explorer.app import handlers as H
    from explorer.app.views import DISPLAY_MAX_SIDE, Session, display_image, rollout_view

    assert DISPLAY_MAX_SIDE == 1600
    rng = np.random.default_rng(3)
    photo = rng.integers(0, 256, (1000, 3200, 3), dtype=np.uint8)
    exp = explain_py(vit_model, photo)
    s = Session(exp=exp, image=photo)
    shown = display_image(s)
    assert shown.shape == (500, 1600, 3)
    means = photo.reshape(500, 2, 1600, 2, 3).astype(float).mean((1, 3))
    assert np.abs(shown.astype(float) - means).max() <= 1.0  # rounding only
    img, _ = rollout_view(s, "en", fusion="mean", discard=0.0, start_layer=0, opacity=0.5, show_mask=False)
    assert img.shape == shown.shape
    x0, y0, x1, y1 = exp.box  # the centre crop, in the photo's pixels
    rows, cols = exp.layout.grid
    for r, c in ((0, 0), (rows - 1, cols - 1), (rows // 2, 1)):
        px = x0 + (c + 0.5) * (x1 - x0) / cols  # the patch's centre in the photo...
        py = y0 + (r + 0.5) * (y1 - y0) / rows
        s2 = H.click(s, (px / 2, py / 2))  # ...clicked on the shown half-size image
        assert s2.query == exp.layout.token_of_patch(r, c)
    assert H.click(s, (1.0, 1.0)).query is None  # left of the crop: no patch
    strip = Session(image=photo[:300, :1000])  # short side under 448, long side 1000
    assert display_image(strip).shape == (300, 1000, 3)  # doubling it would pass 1600: left as it is


def test_display_image_is_made_once_per_image():
    """A small photo is enlarged for display once, not on every slider event, and a new image
    (a copy of the session with another photo) gets its own."""
    import dataclasses

    from explorer.app.views import Session, display_image

    small = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    s = Session(image=small)
    first = display_image(s)
    assert first.shape == (480, 720, 3) and display_image(s) is first  # 12× (ceil(448 / 40))
    np.testing.assert_array_equal(first[::12, ::12], small)
    other = small[::-1].copy()
    s2 = dataclasses.replace(s, image=other)
    np.testing.assert_array_equal(display_image(s2)[::12, ::12], other)
    assert display_image(s) is first


def test_light_events_turn_errors_into_messages(caplog):
    """A slider, click, query or language event that fails says why in the user's language (a NaN
    discard ratio sent by a script; a checkpoint file the upload cache removed, without the
    server's path); anything unforeseen is logged and reported as an internal error. Gradio
    showed a bare "Error" before."""
    import gradio as gr

    from explorer.app.i18n import error_text
    from explorer.app.main import answered
    from explorer.errors import CheckpointError, InputError

    with pytest.raises(gr.Error, match=r"discard ratio must lie in \[0, 1\); got nan"):
        with answered("en", "attention"):
            raise InputError("discard ratio must lie in [0, 1); got nan", code="bad_option", name="discard")
    with pytest.raises(gr.Error, match="选项 discard 的值超出允许范围"):
        with answered("zh-CN", "attention"):
            raise InputError("discard ratio must lie in [0, 1); got nan", code="bad_option", name="discard")
    with pytest.raises(gr.Error) as ei:
        with answered("zh-CN", "click"):
            raise ZeroDivisionError("a bug")
    assert "服务器仍在运行" in ei.value.message and "unexpected error in click" in caplog.text
    gone = CheckpointError("No checkpoint file at /tmp/gradio/abc/ck.pth.", code="no_file", path="/tmp/gradio/abc")
    assert "/tmp" not in error_text("en", gone) and "Upload it again" in error_text("en", gone)
    assert "请重新上传" in error_text("zh-CN", gone)


def test_session_keeps_the_shown_image_and_the_upload_not_the_full_photo(vit_model, tmp_path):
    """A session holds the image as shown (at most 1600 px) and the uploaded file as it came; the
    full-size photo is decoded again only for the download. A 190-KB PNG of 49 megapixels held
    148 MB per session. Clicks, the crop note and the full-size download are unchanged."""
    import io
    import zipfile

    from explorer.app import handlers as H
    from explorer.app.views import display_image, rollout_view

    photo = np.zeros((2400, 4000, 3), np.uint8)
    photo[::7] = 200  # some structure, still a small PNG
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    path = tmp_path / "big.png"
    path.write_bytes(buf.getvalue())
    s = H.explain_file(vit_model, str(path), "en", "vit")
    assert s.image.shape == (960, 1600, 3) and s.source == buf.getvalue() and s.size() == (4000, 2400)
    assert display_image(s) is s.image  # already the shown size: no second copy
    np.testing.assert_array_equal(s.full_image(), photo)
    assert "4000×2400" in H.notes_text(s, "en")  # the crop note names the photo's own size
    img, _ = rollout_view(s, "en", fusion="mean", discard=0.0, start_layer=0, opacity=0.5, show_mask=False)
    assert img.shape == (960, 1600, 3)
    x0, y0, x1, y1 = s.exp.box
    rows, cols = s.exp.layout.grid
    k = 1600 / 4000
    centre = ((x0 + (1.5 * (x1 - x0) / cols)) * k, (y0 + 2.5 * (y1 - y0) / rows) * k)  # patch (2, 1)
    assert H.click(s, centre).query == s.exp.layout.token_of_patch(2, 1)
    z = zipfile.ZipFile(H.export(s, "en", H.Controls(), folder=str(tmp_path)))
    assert Image.open(io.BytesIO(z.read("rollout.png"))).size == (4000, 2400)
    # what is compressed already (PNG, npz) is stored as it is; the JSON is deflated
    kinds = {i.filename: i.compress_type for i in z.infolist()}
    assert kinds["rollout.png"] == kinds["arrays.npz"] == zipfile.ZIP_STORED
    assert kinds["summary.json"] == zipfile.ZIP_DEFLATED
    arrays = np.load(io.BytesIO(z.read("arrays.npz")))
    np.testing.assert_array_equal(arrays["attention"], s.exp.attention)
    np.testing.assert_array_equal(arrays["tokens"], s.exp.tokens)
    # an image already small enough is kept as it is, without the upload
    small = H.explain_file(vit_model, _png_file(tmp_path), "en", "vit")
    assert small.source is None and small.full_image() is small.image


def _png_file(tmp_path) -> str:
    p = tmp_path / "mid.png"
    Image.fromarray(np.full((600, 900, 3), 90, np.uint8)).save(p)
    return str(p)


def test_start_image_and_gallery_are_examples_the_model_gets_right():
    """The example shown at start is one the model classifies right (its first choice is the
    example's folder), the most confident such; the gallery shows one example per class, one the
    model gets right wherever the class has one. Checked against explanations made here."""
    from pathlib import Path

    from explorer import explain as explain_py, load_model
    from explorer.app import handlers as H
    from explorer.app.tsne import default_example
    from explorer.images import decode

    shapes = H.examples("shapes")
    model = load_model("classroom-vit")
    top = {p: explain_py(model, decode(Path(p).read_bytes()).array).topk[0] for p in shapes}
    right = {p: t[2] for p, t in top.items() if t[1] == Path(p).parent.name}
    assert right and len(right) < len(shapes)  # some are wrong: the choice matters
    start = default_example(shapes, model)
    assert start in right and right[start] == max(right.values())
    gallery = H.one_example_per_class(shapes, model)
    classes = sorted({Path(p).parent.name for p in shapes})
    assert [Path(p).parent.name for p in gallery] == classes
    for p in gallery:
        mine = [q for q in right if Path(q).parent.name == Path(p).parent.name]
        assert (p in right) == bool(mine) and (not mine or right[p] == max(right[q] for q in mine))
