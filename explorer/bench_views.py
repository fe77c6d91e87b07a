"""The app-facing cases of :mod:`explorer.bench`: every view of one image, and slider / click events.

Both call what the app calls (explorer/app/views.py and explorer/app/handlers.py) on a
``views.Session`` built from one Explanation; importing them loads Gradio (explorer/app/__init__.py).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .bench_cases import BenchConfig, Models
from .bench_core import Row, Stats, Timer, ratio
from .bench_runs import (ForwardCounter, app_attention, ours_explain, plain_forward, prepared_batch,
                         synthetic_photo, views_app, views_computed)
from .zoo import assets_dir


# ----------------------------------------------------------------------------- views

def case_views(cfg: BenchConfig, models: Models, timer: Timer) -> list[Row]:
    from .app import views

    rows: list[Row] = []
    w, h = cfg.photo_size
    photo = synthetic_photo(w, h, seed=2)
    for key in models.keys():
        loaded = models.get(key)
        net = loaded.model
        cfg.log(f"views: {key} at {w}×{h}")
        x1, prep, sizes = prepared_batch(loaded, [photo], cfg.device)
        exp = ours_explain(loaded, x1, prep, sizes)[0]
        sess = views.Session(model=loaded.name, exp=exp, image=photo)
        parts: dict[str, list[float]] = {}
        app_parts: dict[str, list[float]] = {}
        copies = [np.empty_like(photo), np.empty_like(photo)]
        st, mem = timer.interleave({"forward": lambda: plain_forward(net, x1),
                                    "views": lambda: views_computed(exp, photo, parts),
                                    "app": lambda: views_app(sess, loaded, "en", app_parts),
                                    # the memory floor of two photo-sized overlays: copying the photo twice
                                    "copies": lambda: [np.copyto(c, photo) for c in copies]},
                                   cfg.repeats, cfg.warmup)
        breakdown = " · ".join(f"{k} {np.median(v) * 1e3:.1f}" for k, v in parts.items()) + " ms"
        breakdown += (f" (two plain copies of the photo, the floor of any two overlays: "
                      f"{st['copies'].median * 1e3:.1f} ms)")
        app_breakdown = " · ".join(f"{k} {np.median(v) * 1e3:.1f}" for k, v in app_parts.items()) + " ms"
        rows.append(Row(f"views.computed[{key}]", "views",
                        f"all views of one image from its Explanation (rollout, layer×head grid, distance, "
                        f"pos-embed similarity, 2 overlays at {w}×{h}) vs one forward pass",
                        ours=st["views"], ref=st["forward"], ref_name="forward",
                        value=ratio(st["views"], st["forward"]), op="<=", threshold=0.25, mem=mem["views"],
                        note=breakdown).judge())
        rows.append(Row(f"views.app[{key}]", "views",
                        "the app's view functions after an explanation (explorer/app/main.py everything(): "
                        "overlays, Plotly figures, captions) vs one forward pass",
                        ours=st["app"], ref=st["forward"], ref_name="forward", value=ratio(st["app"], st["forward"]),
                        op="<=", threshold=0.25, mem=mem["app"], note=app_breakdown).judge())
    return rows


# ----------------------------------------------------------------------------- slider / click

def _events(L: int, tokens: int, tnt: bool, rng: np.random.Generator) -> dict[str, Callable]:
    from .app import handlers as H

    def control(name: str, values: list) -> Callable:
        it = iter(values * 1000)
        return lambda s: (s, app_attention(s, **{name: next(it)}))

    def click(s):
        from .app import views
        disp_h, disp_w = views.display_image(s).shape[:2]
        s2 = H.click(s, (float(rng.uniform(0, disp_w)), float(rng.uniform(0, disp_h))))
        return s2, app_attention(s2, grid=True)

    def query(s):
        s2 = H.set_query(s, int(rng.integers(0, tokens)))
        return s2, app_attention(s2, grid=True)

    ev = {"fusion": control("fusion", ["max", "min", "mean"]),
          "discard": control("discard", [0.5, 0.9, 0.0]),
          "start_layer": control("start", list(range(1, L)) + [0]),
          "opacity": control("opacity", [0.3, 0.8, 0.55]),
          "click": click, "query": query}
    if tnt:
        ev["inner_layer"] = control("inner_layer", list(range(1, L)) + [0])
    return ev


def _encoder(cfg: BenchConfig) -> Callable[[dict], None]:
    """What the server does with an event's outputs before it answers: the app's own components
    (built by explorer/app/main.py) encode the overlay and the inner map as image files and the
    layer × head grid as Plotly JSON (Gradio's ``postprocess``)."""
    from .app.main import build_app

    demo = build_app()
    comps = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    cache = str(cfg.workdir / "gradio-cache")
    outputs = {"overlay": comps["overlay"], "inner": comps["inner"], "layer_head": comps["layer_head"]}
    for c in outputs.values():
        c.GRADIO_CACHE = cache  # the bench's temporary folder, not the system's Gradio cache

    def encode(out: dict) -> None:
        for key, comp in outputs.items():
            if out.get(key) is not None:
                comp.postprocess(out[key])
    return encode


def _encoded(result: tuple, encode: Callable[[dict], None]) -> tuple:
    encode(result[1])
    return result


def _slider_row(cfg: BenchConfig, loaded: Any, image: np.ndarray, rid: str, what: str, target: bool,
                timer: Timer, encode: Callable[[dict], None]) -> list[Row]:
    from .app import handlers as H
    from .app import views

    net = loaded.model
    x, prep, sizes = prepared_batch(loaded, [image], cfg.device)
    exp = ours_explain(loaded, x, prep, sizes)[0]
    s = views.Session(model=loaded.name, exp=exp, image=image)
    events = {kind: (lambda fn: lambda s: _encoded(fn(s), encode))(fn) for kind, fn in
              _events(exp.num_layers, exp.layout.num_tokens, exp.inner_attention is not None,
                      np.random.default_rng(0)).items()}
    n = cfg.repeats if cfg.quick else max(cfg.repeats, 5)
    first: dict[str, float] = {}
    for kind, fn in events.items():  # warm-up: the first event of each kind fills the session's caches
        (s, _out), dt, _mem = timer.once(lambda: fn(s))
        first[kind] = dt * 1e3
    counter = ForwardCounter(net)
    before = H.COUNTERS.forward_passes
    times: dict[str, list[float]] = {k: [] for k in events}
    peak: dict[str, float] = {}
    try:
        for r in range(n):
            for kind, fn in events.items():
                (s, _out), dt, mem = timer.once(lambda: fn(s), memory=True)
                times[kind].append(dt)
                peak = {k: max(peak.get(k, 0.0), v) for k, v in mem.items()}
    finally:
        counter.close()
    passes = counter.calls + (H.COUNTERS.forward_passes - before)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    worst = max(med, key=med.get)  # type: ignore[arg-type]
    allt = Stats([t for v in times.values() for t in v])
    rows = [Row(rid, "slider", what, ours=allt, value=med[worst], unit="ms", op="<=" if target else None,
                threshold=50.0 if target else None, mem=peak,
                note=f"slowest kind {worst}; medians ms: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()),
                extra={"median_ms_by_event": med, "image": list(image.shape)}).judge()]
    if target:
        cold = max(first, key=first.get)  # type: ignore[arg-type]
        rows.append(Row(rid.replace("latency", "first"), "slider",
                        "the first event of each kind on a new explanation (before the timed rounds; it fills "
                        "the caches: the first discard ratio sorts every row once)", value=first[cold], unit="ms",
                        note=f"slowest {cold}; ms: " + ", ".join(f"{k} {v:.1f}" for k, v in first.items()),
                        extra={"first_ms_by_event": first}))
    if target:
        rows.append(Row(rid.replace("latency", "forward_passes"), "slider",
                        "forward passes run while answering those events (pre-hook on the model + "
                        "explorer.app.handlers.COUNTERS)", value=float(passes), unit="count", op="<=",
                        threshold=0.0, extra={"hook_calls": counter.calls, "events": n * len(events)}).judge())
    return rows


def case_slider(cfg: BenchConfig, models: Models, timer: Timer) -> list[Row]:
    from .app import views
    from .images import decode

    rows: list[Row] = []
    photo_path = assets_dir() / "examples" / "photos" / "coffee.png"
    image = decode(photo_path).array if photo_path.is_file() else synthetic_photo(600, 400, seed=3)
    encode = _encoder(cfg)
    for key in models.keys():
        loaded = models.get(key)
        cfg.log(f"slider: {key}")
        rows += _slider_row(cfg, loaded, image, f"slider.latency[{key}]",
                            f"one slider/click/query event answered from the session and encoded for the browser "
                            f"(slowest kind's median), {image.shape[1]}×{image.shape[0]} photo, {loaded.name}",
                            True, timer, encode)
    if "vit" in models.keys():
        w, h = cfg.photo_size
        rows += _slider_row(cfg, models.get("vit"), synthetic_photo(w, h, seed=4), "slider.latency_photo[vit]",
                            f"the same events on a {w}×{h} photo (shown at most {views.DISPLAY_MAX_SIDE} px "
                            f"on its longest side)",
                            False, timer, encode)
    return rows


CASES = {"views": case_views, "slider": case_slider}
