"""The simulated users of :mod:`explorer.soak`: their inputs (valid and malformed), the answers
they must get (computed here with the library), and one student's session of requests."""
from __future__ import annotations

import io
import random
import struct
import threading
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONTROLS = ("mean", 0.0, 1, 0.55, True, 1)  # fusion, discard, start layer (from 1), opacity, mask, inner layer
PRED, LOAD_PRED, LOAD_STATUS = 16, 22, 5  # output positions in /explain and /load_model


# ----------------------------------------------------------------------------- inputs

def _png(arr) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _bomb(w: int = 20000, h: int = 20000) -> bytes:
    """A 1-bit PNG declaring w×h pixels in a few KB."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = zlib.compress(b"\x00" * ((w + 7) // 8 + 1) * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)) + \
        chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def make_inputs(folder: Path) -> dict:
    """Valid example images and malformed files, with the message each malformed one must get."""
    import numpy as np

    rng = np.random.default_rng(0)
    shapes = ROOT / "assets" / "examples" / "shapes"
    valid = [sorted((shapes / k).glob(f"{k}_*[0-9].png"))[0] for k in ("star", "ring", "cross", "crescent")]
    bad = {  # name: (bytes, en, zh)
        "empty.png": (b"", "empty (0 bytes)", "文件是空的"),
        "page.png": (b"<html><body>not a picture</body></html>", "not an image", "不是图像"),
        "cut.png": (_png(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))[:600], "damaged or cut short", "已损坏"),
        "bomb.png": (_bomb(), "Image too large", "图像太大"),
        "tiny.png": (_png(np.zeros((3, 3, 3), np.uint8)), "smaller than one", "图像块还小"),
        "sliver.png": (_png(np.zeros((6, 200, 3), np.uint8)), "aspect ratio over", "长宽比超过"),
        "art.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>', "SVG", "SVG"),
    }
    files = {}
    for name, (data, en, zh) in bad.items():
        (folder / name).write_bytes(data)
        files[name] = (folder / name, en, zh)
    pair = [folder / "a.png", folder / "b.png"]
    for i, p in enumerate(pair):
        p.write_bytes(_png(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    return {"valid": valid, "bad_images": files, "pair": pair}


def expected_answers(images: list[Path], specs: list[str]) -> dict:
    """Top-5 {label: probability} of every (model, image), computed here with the library."""
    import torch

    from . import explain, load_model
    from .images import decode

    torch.set_num_threads(1)
    out = {}
    for spec in specs:
        model = load_model(spec)
        for p in images:
            exp = explain(model, decode(p.read_bytes()).array)
            out[(spec, p.name)] = {label: prob for _, label, prob in exp.topk}
    return out


# ----------------------------------------------------------------------------- load

@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)
    latencies: list = field(default_factory=list)
    done: int = 0
    rss: dict = field(default_factory=dict)

    def add(self, kind: str, ok: bool, seconds: float, detail: str, server: Any, marks: tuple[int, ...]) -> None:
        with self.lock:
            self.counts[(kind, ok)] += 1
            self.latencies.append(seconds)
            if not ok and len(self.failures) < 20:
                self.failures.append(detail)
            self.done += 1
            if self.done in marks:
                self.rss[self.done] = server.rss_mb()


def top5(pred: dict) -> dict:
    return {d["label"]: d["confidence"] for d in pred.get("confidences") or []}


def same_answer(got: dict, want: dict) -> bool:
    return set(got) == set(want) and all(abs(got[k] - v) < 1e-4 for k, v in want.items())


class User:
    """One simulated student: their own session, image, model and query."""

    def __init__(self, url: str, inputs: dict, expected: dict, malformed: float, seed: int) -> None:
        from gradio_client import Client

        self.c = Client(url, verbose=False)
        self.inputs, self.expected, self.malformed = inputs, expected, malformed
        self.rng = random.Random(seed)
        self.model, self.image, self.query = "classroom-vit", None, 0

    # each returns (kind, ok, detail)
    def explain(self, path: Path | None = None):
        from gradio_client import handle_file
        path = path or self.rng.choice(self.inputs["valid"])
        out = self.c.predict(handle_file(str(path)), "en", *CONTROLS, 8, 8, api_name="/explain")
        self.image, self.query = path, 0
        ok = same_answer(top5(out[PRED]), self.expected[(self.model, path.name)])
        return "explain", ok, f"explain {self.model} {path.name}: {top5(out[PRED])}"

    def switch(self):
        from gradio_client import handle_file
        new = "classroom-tnt" if self.model == "classroom-vit" else "classroom-vit"
        out = self.c.predict(new, None, "", handle_file(str(self.image)), "en", *CONTROLS, 8, 8,
                             api_name="/load_model")
        self.model, self.query = new, 0
        ok = f"Loaded **{new}**" in out[LOAD_STATUS] and same_answer(top5(out[LOAD_PRED]),
                                                               self.expected[(new, self.image.name)])
        return "load_model", ok, f"switch to {new}: {out[LOAD_STATUS][:80]}"

    def set_query(self):
        token = self.rng.randint(1, 64)
        q = self.c.predict(token, "en", *CONTROLS, api_name="/set_query")[5]
        self.query = token
        return "set_query", q == token, f"set_query {token} -> {q}"

    def attention(self):
        """A slider or fusion change: the caption must still name this user's own query token
        (both classroom models: one class token, then an 8×8 grid)."""
        out = self.c.predict("en", self.rng.choice(["mean", "max", "min"]), 0.0, 1, 0.55, True, 1,
                             api_name="/attention")
        q = self.query
        want = "the class token" if q == 0 else f"patch {q - 1} (row {(q - 1) // 8}, col {(q - 1) % 8})"
        return "attention", want in out[1], f"attention: {want!r} not in {out[1][:80]!r}"

    def tsne(self):
        fig, text = self.c.predict("bundled", 5, 6, [], "label", False, "en", api_name="/tsne")
        return "tsne", "40 images embedded" in text, f"tsne: {text[:80]}"

    def bad(self):
        """A malformed request: it must come back with its own message in the language asked."""
        from gradio_client import handle_file
        lang = self.rng.choice(["en", "zh-CN"])
        choice = self.rng.choice(list(self.inputs["bad_images"]) + ["unknown", "resnet", "query", "pair"])
        try:
            if choice in self.inputs["bad_images"]:
                path, en, zh = self.inputs["bad_images"][choice]
                self.c.predict(handle_file(str(path)), lang, *CONTROLS, 8, 8, api_name="/explain")
                return "malformed", False, f"{choice}: no error"
            if choice in ("unknown", "resnet"):
                name, en, zh = {"unknown": ("vit_hyper_patch99_999", "is not a timm model name", "不是 timm 的模型名"),
                                "resnet": ("resnet50", "not a family this explorer supports", "不属于本工具支持的模型族")}[choice]
                out = self.c.predict(name, None, "", None, lang, *CONTROLS, 8, 8, api_name="/load_model")
                text = out[LOAD_STATUS]
                ok = (zh if lang == "zh-CN" else en) in text and out[0].get("value") == self.model
                return "malformed", ok, f"{choice} ({lang}): {text[:100]}"
            if choice == "query":
                en, zh = "outside", "超出范围"
                self.c.predict(9999, lang, *CONTROLS, api_name="/set_query")
            else:
                en, zh = "at least 5 images; got 2", "至少需要 5 张图像"
                self.c.predict("upload", 5, 6, [handle_file(str(p)) for p in self.inputs["pair"]], "label", False,
                               lang, api_name="/tsne")
            return "malformed", False, f"{choice}: no error"
        except Exception as e:  # AppError carries the app's message
            ok = type(e).__name__ == "AppError" and (zh if lang == "zh-CN" else en) in str(e)
            return "malformed", ok, f"{choice} ({lang}): {type(e).__name__}: {str(e)[:100]}"

    def step(self):
        if self.image is None:
            return self.explain()
        if self.rng.random() < self.malformed:
            return self.bad()
        r = self.rng.random()
        return (self.explain() if r < 0.5 else self.set_query() if r < 0.65 else self.attention() if r < 0.85
                else self.switch() if r < 0.96 else self.tsne())

    def warm_up(self, full: bool = True) -> None:
        """Every kind of request once (short runs: one of each malformed kind is enough for one
        user), so that imports and caches are in place before memory is first measured."""
        self.explain()
        self.set_query()
        self.attention()
        self.switch()
        self.explain()
        if full:
            self.tsne()
            for path, _, _ in self.inputs["bad_images"].values():
                self._quietly(path)
        self.switch()

    def _quietly(self, path: Path) -> None:
        from gradio_client import handle_file
        try:
            self.c.predict(handle_file(str(path)), "en", *CONTROLS, 8, 8, api_name="/explain")
        except Exception:
            pass
