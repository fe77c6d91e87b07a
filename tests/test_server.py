"""The server as a public app must run it: file routes that serve only what the app wrote, no
fetching of URLs handed to it, direct routes and monitoring closed, bounded uploads and request
bodies, a bounded queue that says "busy" at once, and results that never mix between users.

One server for the module, with a queue of 4 waiting events so that "full" is easy to reach.
"""
from __future__ import annotations

import concurrent.futures as cf
import http.client
import os
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlparse

import pytest

from _app import running_app
from _hostile import CONTROLS, Sink, app_config, file_data, http_status, raw_call, raw_join, raw_wait, upload

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "assets" / "examples" / "shapes"
QUEUE = 4
PRED = 16


def example(kind: str, i: int = 0) -> Path:
    return sorted((SHAPES / kind).glob(f"{kind}_*[0-9].png"))[i]


@pytest.fixture(scope="module")
def server():
    with running_app({"VIT_EXPLORER_QUEUE": str(QUEUE)}) as running:
        yield running


@pytest.fixture(scope="module")
def url(server):
    return server[1]


def explain(client, path, lang="en"):
    return client.predict(handle_file(str(path)), lang, *CONTROLS, 8, 8, api_name="/explain")


# ----------------------------------------------------------------------------- files

def test_file_routes_serve_only_what_the_app_wrote(url):
    own = ROOT / "explorer" / "zoo.py"
    secret = "def load_model("
    probes = ["/etc/passwd", "../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e/%2e%2e/etc/passwd",
              str(own), "explorer/zoo.py", "./explorer/zoo.py", "/proc/self/environ", "/proc/self/cmdline",
              str(ROOT / "assets" / "classroom-vit" / "config.json"), str(example("star")),
              "/tmp/gradio/../../etc/passwd", "//etc/passwd"]
    for p in probes:
        for route in ("gradio_api/file=", "file=", "gradio_api/file/", "static/../", "assets/../"):
            status, body = http_status(url + route + p)
            assert status in (400, 403, 404, 405), (route + p, status)
            assert b"root:" not in body and secret.encode() not in body
    status, _ = http_status(url + "gradio_api/file=" + quote(str(own)))
    assert status in (403, 404)
    # what the app itself wrote is served
    client = Client(url, verbose=False)
    overlay = explain(client, example("star"))[0]
    status, body = http_status(url + "gradio_api/file=" + overlay)
    assert status == 200 and body[:3] == b"\xff\xd8\xff"  # the overlay is sent as JPEG


def test_urls_handed_to_the_app_are_never_fetched(url):
    sink = Sink()
    try:
        target = sink.url + "/cat.png"
        for payload in (file_data(url=target), file_data(path=target, url=target), target):
            # refused by Gradio, or (a URL with no file) taken as "no image": never a prediction
            ev = raw_call(url, "explain", [payload, "en", *CONTROLS, 8, 8])
            assert "confidences" not in str(ev.get("output")), ev
            raw_call(url, "load_model", ["vit_tiny_patch16_224", payload, "", None, "en", *CONTROLS, 8, 8])
            ev = raw_call(url, "tsne", ["upload", 5, 6, [payload] * 5, "label", False, "en"])
            assert ev.get("success") is not True
        client = Client(url, verbose=False)  # gradio_client passes URLs through as URLs
        with pytest.raises(Exception):
            explain(client, target)
        time.sleep(0.5)
        assert sink.hits == []
    finally:
        sink.close()


# ----------------------------------------------------------------------------- routes

def test_direct_routes_and_monitoring_are_closed(url):
    body = b'{"data": [null, "en"]}'
    headers = {"Content-Type": "application/json"}
    for route in ("gradio_api/api/explain", "gradio_api/run/explain", "gradio_api/api/predict",
                  "gradio_api/api/no_such_name", "api/predict", "run/predict", "api/explain"):
        status, text = http_status(url + route, "POST", body, headers)
        assert 400 <= status < 500, (route, status, text[:200])  # refused, and never a 500
    for route in ("gradio_api/monitoring", "monitoring", "gradio_api/monitoring/summary"):
        status, _ = http_status(url + route)
        assert status in (401, 403, 404), (route, status)


def test_uploads_and_request_bodies_are_bounded(url):
    u = urlparse(url)
    # an upload over the limit (50 MB)
    boundary = "xXx"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.pth\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    body = head + b"\0" * (51 * 2**20) + f"\r\n--{boundary}--\r\n".encode()
    status, text = http_status(url + "gradio_api/upload", "POST", body,
                               {"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=30)
    assert status == 413, (status, text[:200])
    # an inline (JSON) body over 64 MB, declared up front: refused before it is read
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.putrequest("POST", "/gradio_api/queue/join")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(65 * 2**20))
    conn.endheaders()
    conn.send(b'{"data": ["')
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()


def test_launch_settings(monkeypatch):
    """What launch() hands Gradio, and how events are limited, without starting a second server."""
    import gradio as gr

    from explorer.app import main

    seen = {}
    demo = main.build_app()
    monkeypatch.setattr(main, "build_app", lambda default_model: demo)
    from explorer.app import server

    monkeypatch.setattr(server, "bound_malloc", lambda: True)  # not in the test process
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: seen.update(kw))
    monkeypatch.setattr(gr.Blocks, "queue", lambda self, **kw: seen.update(queue=kw) or self)
    monkeypatch.setenv("VIT_EXPLORER_QUEUE", "7")
    main.launch(port=1)
    assert seen["queue"] == {"max_size": 7, "default_concurrency_limit": 1, "api_open": False}
    assert seen["max_threads"] == max(4, 2 * (os.cpu_count() or 2))
    assert seen["max_file_size"] == 50 * 2**20 and seen["enable_monitoring"] is False
    assert seen["show_error"] is False and seen["server_name"] == "127.0.0.1"
    assert 0 < seen["state_session_capacity"] <= 1000
    assert any("BodyLimit" in repr(m) for m in seen["app_kwargs"]["middleware"])
    # every event that runs a model (load, forward pass, embedding) shares one slot: with the
    # default limit of 1, no model ever runs two requests at once
    fns = list(demo.fns.values()) if isinstance(demo.fns, dict) else list(demo.fns)
    heavy = [f for f in fns if f.name in ("on_image", "on_load", "on_tsne")]
    assert len(heavy) == 4  # the image, the load button, the model picker, the t-SNE button
    assert {(f.concurrency_id, f.concurrency_limit) for f in heavy} == {("model", "default")}


# ----------------------------------------------------------------------------- queue and users

def test_a_full_queue_answers_busy_at_once_and_accepted_requests_complete(url):
    """3 × the queue size at once: the excess is refused (503) while the accepted requests are
    still waiting for the model, and every accepted one completes.

    Refused at once means without waiting for a slot: every refusal takes less time, from its
    own join, than any accepted request takes to its result (at least one explanation), which a
    queue that held refused requests could not do. Compared, not bounded in seconds, so a loaded
    machine slows both sides alike; timed from each request's own start, so a thread that starts
    late is not counted against the server. Joins are raw HTTP with bodies made beforehand, so
    that what is timed is the server's decision, not uploads or fetching the app's config."""
    n = 3 * QUEUE
    server_path = upload(url, example("star"))
    image = file_data(path=server_path, name="star.png")
    config = app_config(url)
    start = threading.Barrier(n)

    def one(_):
        start.wait()
        t0 = time.perf_counter()
        status, session, _ = raw_join(url, "explain", [image, "en", *CONTROLS, 8, 8], config=config)
        if status != 200:
            return status, time.perf_counter() - t0, None
        ev = raw_wait(url, session)
        labels = [d.get("label") for d in (ev.get("output") or {}).get("data", [])
                  if isinstance(d, dict) and "confidences" in d]
        return status, time.perf_counter() - t0, ev.get("success") and labels and labels[0]

    with cf.ThreadPoolExecutor(n) as ex:
        results = list(ex.map(one, range(n)))
    busy = [r for r in results if r[0] == 503]
    done = [r for r in results if r[0] == 200]
    assert len(busy) + len(done) == n, results
    assert busy, "nothing was refused: the queue is not bounded"
    assert len(done) >= QUEUE and all(r[2] for r in done), done  # every accepted request completed
    assert len({r[2] for r in done}) == 1  # ... with the star's answer
    refused, fastest = max(r[1] for r in busy), min(r[1] for r in done)
    assert refused < fastest, (f"a refusal took {refused:.2f} s, the fastest accepted request "
                               f"{fastest:.2f} s to its result: refusals waited for the work")
    print(f"refused within {refused:.3f} s; accepted requests took {fastest:.3f} to "
          f"{max(r[1] for r in done):.3f} s to their results")


def test_results_never_mix_between_concurrent_users(url):
    """Each user sends their own image, several times, at the same time as the others, then asks
    for a query token of their own: every answer must be the one for that user's image."""
    from explorer import explain as explain_py, load_model
    from explorer.images import decode

    model = load_model("classroom-vit")
    kinds = ["star", "ring", "cross", "crescent"]
    images = {k: example(k, 1) for k in kinds}
    expected = {}
    for k, p in images.items():
        exp = explain_py(model, decode(p.read_bytes()).array)
        expected[k] = {label: prob for _, label, prob in exp.topk}

    def user(kind: str) -> list[str]:
        c = Client(url, verbose=False)
        problems = []
        for round_ in range(2):
            out = explain(c, images[kind])
            conf = {d["label"]: d["confidence"] for d in out[PRED]["confidences"]}
            if set(conf) != set(expected[kind]) or any(abs(conf[k] - v) > 1e-4 for k, v in expected[kind].items()):
                problems.append(f"{kind} round {round_}: got {conf}")
            token = 1 + kinds.index(kind) * 7 + round_
            q = c.predict(token, "en", *CONTROLS, api_name="/set_query")[5]
            if q != token:
                problems.append(f"{kind}: query {q} instead of {token}")
        return problems

    with cf.ThreadPoolExecutor(len(kinds)) as ex:
        problems = sum(ex.map(user, kinds), [])
    assert problems == []


def test_offline_names_answer_in_seconds(url):
    """This server runs with HF_HUB_OFFLINE=1, as on a machine without network."""
    client = Client(url, verbose=False)
    t0 = time.perf_counter()
    out = client.predict("vit_small_patch16_224.augreg_in21k_ft_in1k", None, "", None, "en", *CONTROLS, 8, 8,
                         api_name="/load_model")
    assert time.perf_counter() - t0 < 5
    assert "cannot be reached" in out[5] and "classroom-vit" in out[5]
    with pytest.raises(AppError, match="outside"):
        client.predict(999, "en", *CONTROLS, api_name="/set_query") if explain(client, example("star")) else None


def test_old_exports_are_pruned(tmp_path):
    """Gradio cleans its own cache; the export folder is the app's, so the app cleans it."""
    from explorer.app.handlers import EXPORT_TTL_S, prune_exports

    old = [tmp_path / "explanation-ab-q0-1234.zip", tmp_path / ".explanation-ab-q0-99.zip.partial"]
    keep = [tmp_path / "explanation-cd-q0-5678.zip", tmp_path / "someone-else.zip"]
    for f in old + keep:
        f.write_bytes(b"x")
    stale = time.time() - EXPORT_TTL_S - 60
    for f in old + keep[1:]:
        os.utime(f, (stale, stale))
    assert prune_exports(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)
    assert prune_exports(tmp_path / "missing") == 0


def test_identical_images_of_two_sessions_are_never_rewritten_while_served(tmp_path):
    """Gradio names a returned image by the hash of its bytes and writes it by truncating the
    file: two sessions returning the same image emptied it under a download in progress (a
    short read, and a traceback in the server). The app's replacement writes each file once, by
    renaming: the same path as Gradio's own, a second identical save only renews its time, a
    damaged file is replaced while a reader holding it still reads its old bytes, and a reader
    racing 300 identical saves never sees a short file."""
    import numpy as np
    from gradio import processing_utils as pu
    from PIL import Image

    from explorer.app.server import atomic_image_cache

    assert atomic_image_cache() and atomic_image_cache()  # idempotent
    save, gradios = pu.save_pil_to_cache, pu.save_pil_to_cache.__wrapped__
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    path = Path(save(img, str(tmp_path / "ours"), "image", "jpeg"))
    theirs = Path(gradios(img, str(tmp_path / "theirs"), "image", "jpeg"))
    assert path.relative_to(tmp_path / "ours") == theirs.relative_to(tmp_path / "theirs")
    assert path.read_bytes() == theirs.read_bytes()
    full, before = path.read_bytes(), path.stat()
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns - 10**9))
    assert save(img, str(tmp_path / "ours"), "image", "jpeg") == str(path)
    after = path.stat()
    assert after.st_ino == before.st_ino and path.read_bytes() == full  # not written again
    assert after.st_mtime_ns > before.st_mtime_ns - 10**9  # but touched: delete_cache ages by time
    path.write_bytes(full[:100])  # a damaged file (an interrupted write of old)
    with open(path, "rb") as held:
        save(img, str(tmp_path / "ours"), "image", "jpeg")
        assert held.read() == full[:100]  # the reader's file was not rewritten under it
    assert path.read_bytes() == full
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temporary left
    short, stop = [], threading.Event()

    def reader() -> None:
        while not stop.is_set():
            with open(path, "rb") as f:
                if len(f.read()) != len(full):
                    short.append(1)

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(300):
        save(img, str(tmp_path / "ours"), "image", "jpeg")
    stop.set()
    t.join()
    assert not short
