"""Build and launch the app: layout from :mod:`.ui`, handlers from :mod:`.handlers`, all wiring here."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import gradio as gr

from .. import zoo
from ..errors import ExplorerError
from . import handlers as H
from . import tsne as TS
from . import views
from .i18n import error_text, pick_lang, t
from .server import atomic_image_cache, trim_memory
from .ui import (DEFAULT_MODEL, SESSION_TTL_S, UI, create_attention_tab, create_distance_tab, create_header,
                 create_model_tab, create_patches_tab, create_posembed_tab, create_sidebar, create_tsne_tab)

log = logging.getLogger(__name__)
CSS = (Path(__file__).with_name("style.css")).read_text(encoding="utf-8")
HEAD = (Path(__file__).with_name("hover.js")).read_text(encoding="utf-8")


def merge(out: dict, new: dict) -> dict:
    """Add ``new`` updates to ``out``; two updates of one component combine (label + value)."""
    for comp, val in new.items():
        old = out.get(comp)
        if isinstance(old, dict) and old.get("__type__") == "update":
            out[comp] = {**old, **val} if isinstance(val, dict) and val.get("__type__") == "update" else \
                {**old, "value": val}
        else:
            out[comp] = val
    return out


def _err(lang: str, e: BaseException) -> gr.Error:
    msg = str(e) if isinstance(e, H.UserError) else error_text(lang, e)
    return gr.Error(msg, title="⚠️", print_exception=False)


@contextlib.contextmanager
def answered(lang: str, what: str):
    """Errors of a light event as messages: the explorer's own (a NaN discard ratio sent by a
    script, a checkpoint file gone from the server) in the user's language, anything else logged
    and reported as an internal error. Without this Gradio showed a bare "Error"."""
    try:
        yield
    except (H.UserError, ExplorerError) as e:
        raise _err(lang, e) from None
    except gr.Error:
        raise
    except Exception:
        raise _unexpected(lang, what) from None


def _unexpected(lang: str, what: str) -> gr.Error:
    """A bug or an input nobody foresaw: log it with its traceback, tell the user in their language
    that the server is still up (Gradio would show a bare "Error" with show_error=False)."""
    log.exception("unexpected error in %s", what)
    return gr.Error(t(lang, "internal_error"), title="⚠️", print_exception=False)


def on_gpu(fn):
    """Run a heavy handler under ZeroGPU (``spaces.GPU``) when that package is installed."""
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return fn
    return spaces.GPU(duration=120)(fn)


def build_app(default_model: str = DEFAULT_MODEL) -> gr.Blocks:
    atomic_image_cache()  # identical images of several sessions are never rewritten while served
    ui = UI(default_model)
    with gr.Blocks(title="ViT Attention Explorer", delete_cache=(600, 3600)) as demo:
        state = gr.State(views.Session(), time_to_live=SESSION_TTL_S)
        model_state = gr.State({"spec": default_model, "checkpoint": None, "arch": None})
        create_header(ui)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                create_sidebar(ui)
            with gr.Column(scale=3):
                with gr.Tabs(elem_id="tabs"):
                    create_attention_tab(ui)
                    create_patches_tab(ui)
                    create_posembed_tab(ui)
                    create_distance_tab(ui)
                    create_tsne_tab(ui)
                    create_model_tab(ui)
        for tab, key in ((ui.tab_attention, "tab_attention"), (ui.tab_patches, "tab_patches"),
                         (ui.tab_pos, "tab_posembed"), (ui.tab_dist, "tab_distance"),
                         (ui.tab_tsne, "tab_tsne"), (ui.tab_about, "tab_about")):
            ui.T(tab, label=key)
        wire(ui, demo, state, model_state)
    return demo


def _loaded(ms: dict) -> Any:
    if ms.get("checkpoint"):
        return zoo.load_model(ms.get("arch") or ms["spec"], checkpoint=ms["checkpoint"])
    return zoo.load_model(ms["spec"])


def block_index(layer: Any) -> int:
    """A layer slider's value, counted from 1 as every view names layers ("layer 1" is the first
    block, as on the depth axis of the distance plot), as the 0-based block index the analysis uses."""
    try:
        return max(0, int(layer or 1) - 1)
    except (TypeError, ValueError):
        return 0


def wire(ui: UI, demo: gr.Blocks, state: gr.State, model_state: gr.State) -> None:
    controls = [ui.fusion, ui.discard, ui.start_layer, ui.opacity, ui.show_mask]
    attn_out = [ui.overlay, ui.caption, ui.layer_head, ui.inner_row, ui.inner_img, ui.inner_md, ui.query]
    ctl_out = [ui.overlay, ui.caption, ui.inner_row, ui.inner_img, ui.inner_md]
    views_out = attn_out + [ui.grid_img, ui.pipeline, ui.conv_note, ui.overlap, ui.cost, ui.pos_plot, ui.pos_md,
                            ui.pixel_plot, ui.mad_plot, ui.mad_md, ui.pred, ui.notes, ui.start_layer,
                            ui.inner_layer, ui.tsne_layer]
    model_out = [ui.card, ui.curve, ui.status]

    def attention(s: views.Session, lang: str, fusion, discard, start, opacity, show_mask, inner_layer,
                  grid: bool = True) -> dict:
        """The attention tab; ``grid=False`` for slider events (the layer × head grid depends only on
        the query, not on fusion, discard, start layer or opacity)."""
        if s.exp is None:
            return {c: gr.update() for c in (attn_out if grid else ctl_out)}
        v = views.attention_tab(s, lang, fusion=fusion, discard=discard, start_layer=block_index(start),
                                opacity=opacity, show_mask=show_mask, inner_layer=block_index(inner_layer),
                                grid=grid)
        out = {ui.overlay: v["overlay"], ui.caption: v["caption"], ui.inner_img: v["inner"],
               ui.inner_row: gr.update(visible=v["inner"] is not None), ui.inner_md: v["inner_md"]}
        if grid:
            out.update({ui.layer_head: v["layer_head"], ui.query: v["query"]})
        return out

    def everything(s: views.Session, lang: str, ms: dict, ctl: list, inner_layer, kernel, stride,
                   calc_size: Any = "model") -> dict:
        out = attention(s, lang, *ctl, inner_layer)
        exp = s.exp
        assert exp is not None
        grid_img, pipe, cost_fig, overlap = views.patches_view(s, lang, kernel, stride, calc_size)
        loaded = _loaded(ms)
        conv_note = views.patch_embed_note(loaded, lang)
        pos_fig, pos_md, pixel_fig = views.posembed_view(s, lang, loaded.facts.grid)
        mad_fig, mad_md = views.distance_view(s, lang)
        L = exp.num_layers
        out.update({ui.grid_img: grid_img, ui.pipeline: pipe, ui.conv_note: conv_note, ui.overlap: overlap,
                    ui.cost: cost_fig, ui.pos_plot: pos_fig, ui.pos_md: pos_md,
                    ui.pixel_plot: gr.update(value=pixel_fig, visible=pixel_fig is not None),
                    ui.mad_plot: mad_fig, ui.mad_md: mad_md,
                    # a feature backbone (no classifier head) says so in place of the classes
                    ui.pred: H.prediction(s, lang, loaded) if exp.topk else t(lang, "prediction_none"),
                    ui.notes: H.notes_text(s, lang),
                    ui.start_layer: gr.update(maximum=L, value=min(block_index(ctl[2]) + 1, L)),
                    ui.inner_layer: gr.update(maximum=L, value=min(block_index(inner_layer) + 1, L)),
                    ui.tsne_layer: gr.update(maximum=L, value=L)})
        return out

    def cleared_views() -> dict:
        """Every view empty: after a new model was loaded with no image to explain."""
        out: dict = {c: None for c in (ui.overlay, ui.layer_head, ui.inner_img, ui.grid_img, ui.cost, ui.pos_plot,
                                       ui.mad_plot, ui.pred, ui.query)}
        out.update({c: "" for c in (ui.caption, ui.inner_md, ui.pipeline, ui.conv_note, ui.overlap, ui.pos_md,
                                    ui.mad_md, ui.notes)})
        out[ui.inner_row] = gr.update(visible=False)
        out[ui.pixel_plot] = gr.update(value=None, visible=False)
        return out

    def model_views(ms: dict, lang: str, status: str) -> dict:
        loaded = _loaded(ms)
        return {ui.card: views.model_card(loaded, lang), ui.curve: views.learning_curve_figure(loaded, lang),
                ui.status: status}

    # --- heavy events: one forward pass each -----------------------------------------------
    @on_gpu
    def on_image(path, s, lang, ms, fusion, discard, start_layer, opacity, show_mask, inner_layer, kernel, stride,
                 calc_size="model"):
        ctl = [fusion, discard, start_layer, opacity, show_mask]
        if not path:
            return {c: gr.update() for c in views_out + [state]}
        try:
            new = H.explain_file(_loaded(ms), path, lang, ms["spec"])
            out = everything(new, lang, ms, ctl, inner_layer, kernel, stride, calc_size)
        except (H.UserError, ExplorerError) as e:
            raise _err(lang, e) from None
        except Exception:
            raise _unexpected(lang, "explain") from None
        out[state] = new
        return out

    view_inputs = controls + [ui.inner_layer, ui.kernel, ui.stride, ui.calc_size]
    ui.image.change(on_image, [ui.image, state, ui.lang, model_state] + view_inputs, [state] + views_out,
                    api_name="explain", concurrency_id="model", show_progress="minimal")

    @on_gpu
    def on_load(spec, checkpoint, arch, path, s, lang, ms, fusion, discard, start_layer, opacity, show_mask,
                inner_layer, kernel, stride, calc_size="model"):
        ck = checkpoint
        previous = ms.get("spec")
        try:
            loaded, status = H.load(spec, ck, arch, lang, previous)
            new_ms = {"spec": spec if not ck else (arch or spec), "checkpoint": ck, "arch": arch or None}
            out = model_views(new_ms, lang, status)
        except H.UserError as e:
            gr.Warning(str(e))
            return {ui.status: f"⚠️ {e}", ui.model: gr.update(value=previous), model_state: ms}
        except Exception:  # a model that builds but breaks the model card: keep the previous one
            raise _unexpected(lang, "load_model") from None
        out[model_state] = new_ms
        out[ui.kernel] = gr.update(value=loaded.facts.patch_size[0], maximum=max(32, loaded.facts.patch_size[0]))
        out[ui.stride] = gr.update(value=loaded.facts.patch_size[0], maximum=max(32, loaded.facts.patch_size[0]))
        if path or s.exp is not None:  # explain the image in the box with the new model, or clear the views
            new = None
            try:
                if path:
                    new = H.explain_file(loaded, path, lang, new_ms["spec"])
                    ps = loaded.facts.patch_size[0]
                    out.update(everything(new, lang, new_ms, [fusion, discard, start_layer, opacity, show_mask],
                                          inner_layer, ps, ps, calc_size))
            except (H.UserError, ExplorerError) as e:
                new = None
                gr.Warning(str(e) if isinstance(e, H.UserError) else error_text(lang, e))
            except Exception:
                new = None
                log.exception("unexpected error explaining after load_model")
                gr.Warning(t(lang, "internal_error"))
            if new is None:  # no image in the box (or it failed): nothing of the old model stays shown
                out.update(cleared_views())
            out[state] = new if new is not None else views.Session()
        trim_memory()  # the model evicted from the cache and the last explanation are garbage now
        return out

    load_out = [model_state, ui.model, ui.kernel, ui.stride, state] + model_out + views_out
    load_in = [ui.model, ui.ck_file, ui.ck_arch, ui.image, state, ui.lang, model_state] + view_inputs
    ui.load_btn.click(on_load, load_in, load_out, api_name="load_model", concurrency_id="model")
    ui.model.input(on_load, load_in, load_out, api_name=False, concurrency_id="model")

    # --- light events: answered from the session's Explanation -------------------------------
    def on_controls(s, lang, fusion, discard, start_layer, opacity, show_mask, inner_layer):
        with answered(lang, "attention"):
            return attention(s, lang, fusion, discard, start_layer, opacity, show_mask, inner_layer, grid=False)

    attn_in = [state, ui.lang] + controls + [ui.inner_layer]
    gr.on([ui.fusion.input, ui.discard.release, ui.start_layer.release, ui.opacity.release, ui.show_mask.input,
           ui.inner_layer.release], on_controls, attn_in, ctl_out, api_name="attention",
          concurrency_limit=4, show_progress="hidden")

    def on_click(s, lang, fusion, discard, start_layer, opacity, show_mask, inner_layer, evt: gr.SelectData):
        with answered(lang, "click"):
            new = H.click(s, evt.index)
            out = attention(new, lang, fusion, discard, start_layer, opacity, show_mask, inner_layer)
        out[state] = new
        return out

    ui.overlay.select(on_click, attn_in, attn_out + [state], api_name=False, concurrency_limit=4,
                      show_progress="hidden")

    def on_query(token, s, lang, fusion, discard, start_layer, opacity, show_mask, inner_layer):
        with answered(lang, "set_query"):
            new = H.set_query(s, None if token is None else int(token))
            out = attention(new, lang, fusion, discard, start_layer, opacity, show_mask, inner_layer)
        out[state] = new
        return out

    q_in = [ui.query, state, ui.lang] + controls + [ui.inner_layer]
    ui.query.submit(on_query, q_in, attn_out + [state], api_name="set_query", concurrency_limit=4)

    def on_reset(s, lang, fusion, discard, start_layer, opacity, show_mask, inner_layer):
        return on_query(None, s, lang, fusion, discard, start_layer, opacity, show_mask, inner_layer)

    ui.reset.click(on_reset, attn_in, attn_out + [state], api_name="reset_query", concurrency_limit=4)

    def on_patches(s, lang, kernel, stride, calc_size="model"):
        if s.exp is None:
            return {c: gr.update() for c in (ui.grid_img, ui.pipeline, ui.cost, ui.overlap)}
        with answered(lang, "patches"):
            grid_img, pipe, fig, text = views.patches_view(s, lang, kernel, stride, calc_size)
        return {ui.grid_img: grid_img, ui.pipeline: pipe, ui.cost: fig, ui.overlap: text}

    gr.on([ui.kernel.release, ui.stride.release, ui.calc_size.input], on_patches,
          [state, ui.lang, ui.kernel, ui.stride, ui.calc_size],
          [ui.grid_img, ui.pipeline, ui.cost, ui.overlap], api_name="patches", concurrency_limit=4)

    def on_export(s, lang, fusion, discard, start_layer, opacity, show_mask):
        try:
            path = H.export(s, lang, H.Controls(fusion, float(discard), block_index(start_layer), opacity, show_mask))
        except H.UserError as e:
            raise _err(lang, e) from None
        except Exception:
            raise _unexpected(lang, "export") from None
        return gr.update(value=path, visible=True)

    ui.export_btn.click(on_export, [state, ui.lang] + controls, ui.export_file, api_name="export",
                        concurrency_limit=2)

    # --- t-SNE -------------------------------------------------------------------------------
    @on_gpu
    def on_tsne(ms, source, count, layer, files, colour, compare, lang, cache, progress=gr.Progress()):
        try:
            fig, text, cache = TS.run(ms, source, int(count), int(layer), files, colour, bool(compare), lang,
                                      cache, progress)
        except (ExplorerError, H.UserError) as e:
            raise _err(lang, e) from None
        except Exception:
            raise _unexpected(lang, "tsne") from None
        return fig, text, cache

    ui.tsne_run.click(on_tsne, [model_state, ui.tsne_source, ui.tsne_count, ui.tsne_layer, ui.tsne_files,
                                ui.tsne_colour, ui.tsne_compare, ui.lang, ui.tsne_state],
                      [ui.tsne_plot, ui.tsne_md, ui.tsne_state], api_name="tsne", concurrency_id="model")

    # --- language and start-up -----------------------------------------------------------------
    text_comps = [c for c, _ in ui.T.items]

    def on_lang(lang, s, ms, fusion, discard, start_layer, opacity, show_mask, inner_layer, kernel, stride,
                calc_size="model"):
        out = dict(zip(text_comps, ui.T.updates(lang)))
        try:
            merge(out, model_views(ms, lang, H.status_text(_loaded(ms), lang)))
            if s.exp is not None and s.model == ms.get("spec"):  # (an explanation of this model)
                merge(out, everything(s, lang, ms, [fusion, discard, start_layer, opacity, show_mask],
                                      inner_layer, kernel, stride, calc_size))
        except (H.UserError, ExplorerError) as e:  # the page is relabelled all the same, and says why
            msg = str(e) if isinstance(e, H.UserError) else error_text(lang, e)
            gr.Warning(msg)
            out[ui.status] = f"⚠️ {msg}"
        except Exception:
            log.exception("unexpected error redrawing the views in another language")
            gr.Warning(t(lang, "internal_error"))
        return out

    ui.lang.input(on_lang, [ui.lang, state, model_state] + view_inputs,
                  text_comps + model_out + views_out, api_name="set_language", concurrency_limit=4)

    def on_start(request: gr.Request):
        lang = pick_lang(request.headers.get("accept-language") if request else None)
        ms = {"spec": ui.default_model, "checkpoint": None, "arch": None}
        out = dict(zip(text_comps, ui.T.updates(lang)))
        out[ui.lang] = lang
        try:
            loaded, status = H.load(ui.default_model, None, None, lang)
            merge(out, model_views(ms, lang, status))
            ps = loaded.facts.patch_size[0]
            merge(out, {ui.kernel: gr.update(value=ps), ui.stride: gr.update(value=ps)})
        except H.UserError as e:
            out[ui.status] = f"⚠️ {e}"
        return out

    def start_image():
        """The first example, set only after ``on_start`` has put the sliders at the model's patch
        size: set in the same update, the image's change event read the sliders' old values, and the
        overlap calculator described kernel 16 beside sliders at 8."""
        shapes = H.examples("shapes")
        if not shapes or ui.image.value is not None:
            return gr.update()
        try:
            path = TS.default_example(shapes, zoo.load_model(ui.default_model))
        except ExplorerError:
            path = TS.default_example(shapes)
        # a copy in the image's own cache: Gradio serves files only from there (and from the
        # working directory), so the bundled file itself showed no image unless the server was
        # started in the repository; no folder of the installation is opened to file requests
        return ui.image.move_resource_to_block_cache(path)

    demo.load(on_start, None, text_comps + [ui.lang, ui.kernel, ui.stride] + model_out,
              api_name=False).then(start_image, None, ui.image, api_name=False)


def launch(host: str | None = None, port: int | None = None, share: bool = False,
           default_model: str = DEFAULT_MODEL, **kwargs: Any) -> None:
    """Launch with settings for a public app.

    - bounded queue (``VIT_EXPLORER_QUEUE``, default 24 waiting events): when it is full a new
      request is refused at once with 503 "queue full" instead of waiting;
    - one heavy event (load, forward pass, embedding) at a time: they share ``concurrency_id="model"``
      with the default limit of 1, so a model is never run by two requests at once;
    - direct HTTP routes that skip the queue closed (``api_open=False``), monitoring off;
    - uploads up to ``VIT_EXPLORER_MAX_UPLOAD`` (default 50 MB), other request bodies up to 64 MB;
    - Gradio's temporary files deleted when older than an hour (checked every 10 minutes), at most
      ``VIT_EXPLORER_SESSIONS`` sessions (default 64) kept in memory, oldest dropped first;
    - worker threads matching the machine (2 per core, at least 4);
    - memory that freed models give back to the system (:func:`.server.bound_malloc`).
    """
    from gradio.route_utils import FnIndexInferError
    from starlette.middleware import Middleware

    from .server import BodyLimit, bound_malloc, not_found, size_bytes

    bound_malloc()
    demo = build_app(default_model)
    cores = os.cpu_count() or 2
    demo.queue(max_size=int(os.environ.get("VIT_EXPLORER_QUEUE", "24")), default_concurrency_limit=1,
               api_open=False)
    app_kwargs = {"exception_handlers": {FnIndexInferError: not_found},
                  "middleware": [Middleware(BodyLimit, limit=64 * 2**20)]}
    app_kwargs.update(kwargs.pop("app_kwargs", None) or {})
    demo.launch(server_name=host or os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                server_port=port or int(os.environ.get("GRADIO_SERVER_PORT", os.environ.get("PORT", "7860"))),
                share=share, max_file_size=size_bytes(os.environ.get("VIT_EXPLORER_MAX_UPLOAD", "50mb")),
                max_threads=max(4, 2 * cores), enable_monitoring=False,
                state_session_capacity=int(os.environ.get("VIT_EXPLORER_SESSIONS", "64")),
                show_error=False, css=CSS, head=HEAD, theme=gr.themes.Soft(primary_hue="indigo"),
                ssr_mode=False, app_kwargs=app_kwargs, **kwargs)
