"""The Gradio app: layout first (one ``create_*_tab`` per view), then all event wiring.

Per-user state is a :class:`~explorer.app.views.Session` in ``gr.State`` (numpy only); models
live in the shared bounded cache of :mod:`explorer.zoo`. Every text goes through a registry so
the language switch can relabel the whole page.
"""
from __future__ import annotations

import logging
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from .. import zoo
from ..errors import ExplorerError
from . import handlers as H
from .i18n import LANG_CHOICES, t

log = logging.getLogger(__name__)

DEFAULT_MODEL = "classroom-vit"
SESSION_TTL_S = 3600


@dataclass
class Texts:
    """Components whose texts follow the language: (component, {attribute: key})."""

    items: list[tuple[Any, dict[str, str]]] = field(default_factory=list)

    def __call__(self, comp: Any, **attrs: str) -> Any:
        self.items.append((comp, attrs))
        return comp

    def updates(self, lang: str) -> list[Any]:
        out = []
        for comp, attrs in self.items:
            kw = {a: t(lang, k) for a, k in attrs.items() if a != "choices"}
            if "choices" in attrs:
                kw["choices"] = [(t(lang, k), v) for k, v in _CHOICE_KEYS[attrs["choices"]]]
            out.append(gr.update(**kw))
        return out


_CHOICE_KEYS = {
    "tsne_source": [("tsne_bundled", "bundled"), ("tsne_upload", "upload")],
    "tsne_colour": [("tsne_by_label", "label"), ("tsne_by_pred", "prediction")],
    "fusion": [("fusion_mean", "mean"), ("fusion_max", "max"), ("fusion_min", "min")],
    "calc_size": [("calc_size_model", "model"), ("calc_size_224", "224"), ("calc_size_384", "384")],
}


def _choices(lang: str, name: str) -> list[tuple[str, str]]:
    return [(t(lang, k), v) for k, v in _CHOICE_KEYS[name]]


class UploadedImage(gr.Image):
    """``gr.Image`` that hands an upload over as a path, undecoded.

    ``gr.Image`` opens every upload with PIL before the event handler runs, so a decompression
    bomb or a text file named ``.png`` would fail inside Gradio with a generic error;
    :func:`explorer.images.decode` checks size and format first and says what is wrong.
    """

    is_template = True  # rendered by the front end's Image component

    def preprocess(self, payload):  # type: ignore[override]
        if payload is None:
            return None
        if (payload.url or "").startswith("data:"):
            return self._data_url_to_file(payload.url)
        # a bare URL without an uploaded file: nothing is fetched (Gradio itself refuses private
        # hosts; an explorer has no business downloading what a request points at)
        return str(payload.path) if payload.path else None

    def _data_url_to_file(self, url: str) -> str:
        """An image sent inline (``data:image/png;base64,...``) written to the cache as it came.

        ``gr.Image`` would decode it with PIL right here: a decompression bomb sent this way would
        be expanded in memory before :func:`explorer.images.decode` could check its size. The
        request body itself is bounded by the server (``BodyLimit`` in server.py).
        """
        import base64
        import binascii
        import hashlib
        from urllib.parse import unquote_to_bytes

        head, _, body = url.partition(",")
        try:
            data = base64.b64decode(body) if head.endswith(";base64") else unquote_to_bytes(body)
        except (binascii.Error, ValueError):
            data = body.encode("utf-8", "replace")  # decode() will call it what it is: not an image
        folder = Path(self.GRADIO_CACHE) / hashlib.sha256(data).hexdigest()[:40]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "inline-image"
        path.write_bytes(data)
        # registered like Gradio's own uploads, so its cache cleaner (delete_cache) removes it too:
        # unregistered, every inline request left its bytes on disk for as long as the server ran
        self.temp_files.add(str(path))
        return str(path)


class UI:
    """Holds the components so wiring can refer to them by name."""

    def __init__(self, default_model: str = DEFAULT_MODEL) -> None:
        self.default_model = default_model
        self.T = Texts()


def create_header(ui: UI) -> None:
    T = ui.T
    with gr.Row(elem_id="header", equal_height=True):
        with gr.Column(scale=5):
            ui.title = T(gr.Markdown(t("en", "header_md"), elem_id="title"), value="header_md")
        with gr.Column(scale=1, min_width=200):
            ui.lang = gr.Radio(LANG_CHOICES, value="en", show_label=False, container=False, elem_id="lang")


def create_sidebar(ui: UI) -> None:
    T = ui.T
    choices = list(zoo.BUNDLED) + zoo.CURATED
    ui.model = T(gr.Dropdown(choices, value=ui.default_model, allow_custom_value=True, elem_id="model"),
                 label="model", info="model_info")
    with T(gr.Accordion("Checkpoint file", open=False), label="checkpoint_acc") as ui.ck_acc:
        ui.ck_file = T(gr.File(file_types=[".safetensors", ".pth", ".pt", ".bin", ".ckpt"], type="filepath"),
                       label="checkpoint")
        ui.ck_arch = T(gr.Textbox(placeholder="vit_base_patch16_224"), label="checkpoint_arch")
    ui.load_btn = T(gr.Button("Load model", variant="secondary", elem_id="load"), value="load")
    ui.status = gr.Markdown(elem_id="status")
    ui.image = T(UploadedImage(type="filepath", image_mode=None, sources=["upload", "clipboard", "webcam"],
                          height=260, elem_id="image"), label="image")
    shapes = H.examples("shapes")
    photos = H.examples("photos")
    try:
        default = zoo.load_model(ui.default_model) if shapes else None
    except ExplorerError:  # a timm default without the hub: the gallery takes each class's first
        default = None
    one_each = H.one_example_per_class(shapes, default)
    # gr.Examples' own label cannot change language (an empty one shows Gradio's "Examples", in the
    # browser's language): a translatable heading stands above each, and style.css hides theirs
    if shapes:
        T(gr.Markdown(t("en", "examples_shapes_md")), value="examples_shapes_md")
        ui.ex_shapes = gr.Examples(one_each, inputs=[ui.image], label="", examples_per_page=8, elem_id="ex_shapes")
    if photos:
        T(gr.Markdown(t("en", "examples_photos_md")), value="examples_photos_md")
        ui.ex_photos = gr.Examples(photos, inputs=[ui.image], label="", elem_id="ex_photos")
    ui.pred = T(gr.Label(num_top_classes=5, elem_id="prediction"), label="prediction")
    ui.notes = gr.Markdown(elem_id="notes")


def create_attention_tab(ui: UI) -> None:
    T = ui.T
    with gr.Tab("Attention", id="attention") as ui.tab_attention:
        T(gr.Markdown(t("en", "howto_attention")), value="howto_attention")
        with gr.Row():
            with gr.Column(scale=3):
                # JPEG: Gradio's default WebP took 140 ms to encode a 1200×800 overlay, ten times the
                # slider event that made it; JPEG takes 5 ms (both are lossy, at similar sizes)
                ui.overlay = gr.Image(type="numpy", interactive=False, show_label=False, height=460,
                                      elem_id="overlay", format="jpeg")
                ui.caption = gr.Markdown(elem_id="caption")
            with gr.Column(scale=2, min_width=260):
                ui.fusion = T(gr.Radio(_choices("en", "fusion"), value="mean", elem_id="fusion"), label="fusion",
                              choices="fusion")
                ui.discard = T(gr.Slider(0, 0.95, value=0.0, step=0.05, elem_id="discard"), label="discard")
                ui.start_layer = T(gr.Slider(1, 12, value=1, step=1, elem_id="start_layer"), label="start_layer")
                ui.opacity = T(gr.Slider(0, 1, value=0.55, step=0.05, elem_id="opacity"), label="opacity")
                ui.show_mask = T(gr.Checkbox(value=True, elem_id="show_mask"), label="show_mask")
                ui.query = T(gr.Number(value=None, precision=0, elem_id="query"), label="query", info="query_info")
                ui.reset = T(gr.Button("Back to the class token", size="sm", elem_id="reset"), value="reset_query")
                ui.export_btn = T(gr.Button("Download", size="sm", elem_id="export"), value="export")
                ui.export_file = gr.File(visible=False, interactive=False, elem_id="export_file")
        ui.layer_head = gr.Plot(show_label=False, elem_id="layer_head")
        with gr.Row(visible=False) as ui.inner_row:
            ui.inner_img = gr.Image(type="numpy", interactive=False, show_label=False, height=220, elem_id="inner",
                                    buttons=[])  # no icons over the top-right share
            with gr.Column():
                ui.inner_md = gr.Markdown(elem_id="inner_md")
                ui.inner_layer = T(gr.Slider(1, 12, value=1, step=1, elem_id="inner_layer"), label="inner_layer")


def create_patches_tab(ui: UI) -> None:
    T = ui.T
    with gr.Tab("Patches and tokens", id="patches") as ui.tab_patches:
        T(gr.Markdown(t("en", "howto_patches")), value="howto_patches")
        with gr.Row():
            ui.grid_img = gr.Image(type="numpy", interactive=False, show_label=False, height=420, elem_id="grid")
            with gr.Column():
                ui.pipeline = gr.Markdown(elem_id="pipeline")
                ui.conv_note = gr.Markdown()
        with gr.Row():
            ui.kernel = T(gr.Slider(2, 32, value=16, step=1, elem_id="kernel"), label="patch_kernel")
            ui.stride = T(gr.Slider(1, 32, value=16, step=1, elem_id="stride"), label="patch_stride")
        # the calculator on the model's own input, or on the paper's 224 px (LESSONS §1-2: 224/16 → 14×14
        # = 196 patches; stride 8 → 27×27 = 729), which the 64-px classroom models cannot show
        ui.calc_size = T(gr.Radio(_choices("en", "calc_size"), value="model", elem_id="calc_size"),
                         label="calc_size", choices="calc_size")
        ui.overlap = gr.Markdown(elem_id="overlap")
        ui.cost = gr.Plot(show_label=False, elem_id="cost")


def create_posembed_tab(ui: UI) -> None:
    T = ui.T
    with gr.Tab("Position embeddings", id="posembed") as ui.tab_pos:
        T(gr.Markdown(t("en", "howto_posembed")), value="howto_posembed")
        ui.pos_plot = gr.Plot(show_label=False, elem_id="pos_plot")
        ui.pos_md = gr.Markdown(elem_id="pos_md")
        ui.pixel_plot = gr.Plot(show_label=False, visible=False, elem_id="pixel_plot")


def create_distance_tab(ui: UI) -> None:
    T = ui.T
    with gr.Tab("Receptive field", id="distance") as ui.tab_dist:
        T(gr.Markdown(t("en", "howto_distance")), value="howto_distance")
        ui.mad_plot = gr.Plot(show_label=False, elem_id="mad_plot")
        ui.mad_md = gr.Markdown(elem_id="mad_md")


def create_tsne_tab(ui: UI) -> None:
    T = ui.T
    with gr.Tab("Class tokens", id="tsne") as ui.tab_tsne:
        T(gr.Markdown(t("en", "howto_tsne")), value="howto_tsne")
        with gr.Row():
            ui.tsne_source = T(gr.Radio(_choices("en", "tsne_source"), value="bundled", elem_id="tsne_source"),
                               label="tsne_source", choices="tsne_source")
            ui.tsne_count = T(gr.Slider(5, 60, value=20, step=1, elem_id="tsne_count"), label="tsne_count")
            ui.tsne_layer = T(gr.Slider(0, 12, value=12, step=1, elem_id="tsne_layer"), label="tsne_layer")
        with gr.Row():
            ui.tsne_files = T(gr.File(file_count="multiple", type="filepath", elem_id="tsne_files"),
                              label="tsne_files")
            with gr.Column():
                ui.tsne_colour = T(gr.Radio(_choices("en", "tsne_colour"), value="label", elem_id="tsne_colour"),
                                   label="tsne_colour", choices="tsne_colour")
                ui.tsne_compare = T(gr.Checkbox(value=True, elem_id="tsne_compare"), label="tsne_compare")
                ui.tsne_run = T(gr.Button("Embed and map", variant="primary", elem_id="tsne_run"), value="tsne_run")
        ui.tsne_plot = gr.Plot(show_label=False, elem_id="tsne_plot")
        ui.tsne_md = gr.Markdown(elem_id="tsne_md")
        ui.tsne_state = gr.State(None)


def create_model_tab(ui: UI) -> None:
    with gr.Tab("Model", id="about") as ui.tab_about:
        ui.card = gr.Markdown(elem_id="card")
        ui.curve = gr.Plot(show_label=False, elem_id="curve")
