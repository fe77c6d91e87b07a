"""Event handlers: session state in, component values out; errors become messages.

Heavy work (loading a model, one forward pass, embedding an image set) happens in ``load`` /
``explain`` / ``tsne``; everything else answers from the Explanation kept in the session.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import zoo
from ..capture import explain
from ..errors import ExplorerError, ImageError, InputError
from ..images import decode
from . import views
from .i18n import error_text, t

log = logging.getLogger(__name__)

EXAMPLES = zoo.assets_dir() / "examples"


class UserError(Exception):
    """An error already translated for the user; the UI layer shows it (gr.Error)."""


@dataclass
class Controls:
    fusion: str = "mean"
    discard: float = 0.0
    start_layer: int = 0
    opacity: float = 0.55
    show_mask: bool = True


@dataclass
class Counters:
    """Server-wide counts (for the benchmark and the soak test): forward passes."""

    forward_passes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)


COUNTERS = Counters()


def fail(lang: str, err: BaseException) -> UserError:
    return UserError(error_text(lang, err))


# ----------------------------------------------------------------------------- examples and masks

def _digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


_MASKS: dict[str, Path] = {}


def mask_index(folder: Path = EXAMPLES) -> dict[str, Path]:
    """sha1 of every shapes example image -> its mask file, so an example keeps its mask however it
    arrives (picked from the examples, or downloaded and uploaded again)."""
    if not _MASKS and folder.is_dir():
        for m in folder.rglob("*.mask.png"):
            img = m.with_name(m.name.replace(".mask.png", ".png"))
            if img.is_file():
                _MASKS[_digest(img.read_bytes())] = m
    return _MASKS


def examples(kind: str) -> list[str]:
    folder = EXAMPLES / kind
    if not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")
                  and not p.name.endswith(".mask.png"))


_EXAMPLE_SCORES: dict[tuple[str, tuple[str, ...]], dict[str, float]] = {}


def example_scores(loaded: Any, paths: list[str]) -> dict[str, float]:
    """For each shapes example (its class is its folder's name): the probability the model gives
    that class when it is also the model's first choice, else -1. Kept per model.

    The bundled models are wrong on some examples (classroom-vit: 77 % validation accuracy); the
    example shown at start and the one per class in the gallery are picked among those the loaded
    model gets right, so a class does not open on a misclassified image.
    """
    key = (loaded.name, tuple(paths))
    if key not in _EXAMPLE_SCORES:
        scores = {}
        for p in paths:
            try:
                exp = explain(loaded, decode(Path(p).read_bytes()).array)
            except (ExplorerError, OSError):
                exp = None
            # topk is best first, named by the model's labels (the folders' names for the bundled set)
            right = exp is not None and bool(exp.topk) and exp.topk[0][1] == Path(p).parent.name
            scores[p] = float(exp.topk[0][2]) if right else -1.0
        _EXAMPLE_SCORES[key] = scores
    return _EXAMPLE_SCORES[key]


def one_example_per_class(paths: list[str], loaded: Any = None) -> list[str]:
    """The gallery: one example per class (folder), the one ``loaded`` classifies right most
    confidently when given, else the first."""
    scores = example_scores(loaded, paths) if loaded is not None else {}
    out = []
    for cls in sorted({Path(p).parent.name for p in paths}):
        mine = [p for p in paths if Path(p).parent.name == cls]
        out.append(max(mine, key=lambda p: (scores.get(p, -1.0), -mine.index(p))))
    return out


# ----------------------------------------------------------------------------- model


def local_dirs_allowed() -> bool:
    """May users name folders on the server (``local-dir:``)? ``VIT_EXPLORER_LOCAL_DIRS=0/1``;
    by default yes, except on a Hugging Face Space (``SPACE_ID`` set), where a visitor could
    otherwise probe the server's folders through the error messages."""
    value = os.environ.get("VIT_EXPLORER_LOCAL_DIRS")
    if value is not None and value.strip():
        return value.strip().lower() not in ("0", "false", "no", "off")
    return not os.environ.get("SPACE_ID")


def load(spec: str, checkpoint: str | None, arch: str | None, lang: str,
         previous: str | None = None) -> tuple[Any, str]:
    """Load a model (shared bounded cache). Returns ``(loaded, status markdown)``.

    A checkpoint file comes with an architecture name (``arch``, or ``spec`` when it is a timm name).
    """
    spec = (spec or "").strip()
    named = ((arch or "").strip() or spec) if checkpoint else spec
    if named.lower().startswith("local-dir:") and not local_dirs_allowed():
        msg = t(lang, "local_dir_off")
        raise UserError(msg + (" " + t(lang, "kept_model", name=previous) if previous else ""))
    try:
        if checkpoint:
            name = (arch or "").strip() or spec
            loaded = zoo.load_model(name, checkpoint=checkpoint)
        else:
            loaded = zoo.load_model(spec)
    except ExplorerError as err:
        msg = error_text(lang, err)
        if previous:
            msg += " " + t(lang, "kept_model", name=previous)
        raise UserError(msg) from err
    return loaded, status_text(loaded, lang)


def status_text(loaded: Any, lang: str) -> str:
    """What the status line says about a loaded model, in ``lang``."""
    source = t(lang, f"source_{loaded.source}")
    status = t(lang, "loaded", name=loaded.name, source=source if not source.startswith("source_") else loaded.source)
    if loaded.source == "bundled":
        classes = (loaded.notes.get("classes_zh") if lang == "zh-CN" else None) or loaded.label_names
        status += " " + t(lang, "bundled_note", classes=t(lang, "list_sep").join(classes))
    return status


# ----------------------------------------------------------------------------- explain


def explain_file(loaded: Any, path: str | None, lang: str, spec: str) -> views.Session:
    """Decode an image file safely and explain it: the one forward pass for this (model, image)."""
    if not path:
        raise UserError(t(lang, "no_image"))
    try:
        try:
            size = os.path.getsize(path)
            data = Path(path).read_bytes() if size <= 64 * 2**20 else None
        except OSError:  # the upload was cleaned from the cache, or never was a file
            raise ImageError("The uploaded file is no longer on the server. Upload it again.",
                             code="no_file", path="") from None
        if data is None:
            raise ImageError("The file is larger than 64 MB.", code="file_too_large",
                             mb=size // 2**20, limit=64)
        decoded = decode(data)
        exp = explain(loaded, decoded.array)
    except ExplorerError as err:
        raise fail(lang, err) from err
    COUNTERS.add("forward_passes")
    exp.notes = decoded.notes
    mask = None
    mpath = mask_index().get(_digest(data))
    if mpath is not None:
        m = decode(mpath.read_bytes()).array[..., 0] > 127
        if m.shape == decoded.array.shape[:2]:
            mask = m
    from ..render.overlay import fit_for_display

    shown = fit_for_display(decoded.array, 448, views.DISPLAY_MAX_SIDE)
    return views.Session(model=spec, exp=exp, image=shown, mask=mask, notes=decoded.notes,
                         source=data if shown is not decoded.array else None, full_size=decoded.size)


def notes_text(s: views.Session, lang: str) -> str:
    assert s.exp is not None and s.image is not None
    out = [t(lang, f"notes_{code}", **params) for code, params in s.notes]
    x0, y0, x1, y1 = s.exp.box
    W, H = s.size()
    if (x1 - x0) < W - 1 or (y1 - y0) < H - 1:
        out.append(t(lang, "saw", w=round(x1 - x0), h=round(y1 - y0), W=W, H=H))
    return " ".join(out)


def prediction(s: views.Session, lang: str, loaded: Any = None) -> dict[str, float]:
    assert s.exp is not None
    names = None
    if loaded is not None and lang == "zh-CN":
        zh = loaded.notes.get("classes_zh")
        if zh and len(zh) == len(loaded.label_names):
            names = zh
    return {(names[i] if names else label): float(p) for i, label, p in s.exp.topk}


# ----------------------------------------------------------------------------- queries


def set_query(s: views.Session, token: int | None) -> views.Session:
    if s.exp is None:
        return s
    if token is not None and not 0 <= int(token) < s.exp.layout.num_tokens:
        raise InputError(f"query token {token} is outside 0..{s.exp.layout.num_tokens - 1}",
                         code="bad_query", query=token, tokens=s.exp.layout.num_tokens)
    return replace(s, query=None if token is None else int(token))


def click(s: views.Session, xy: tuple[float, float]) -> views.Session:
    if s.exp is None:
        return s
    token = views.click_to_token(s, float(xy[0]), float(xy[1]))
    return s if token is None else replace(s, query=token)


EXPORT_TTL_S = 3600


def prune_exports(folder: Path, max_age_s: float = EXPORT_TTL_S) -> int:
    """Delete this app's export zips (and leftovers of interrupted writes) older than ``max_age_s``.

    Gradio copies each returned zip into its own cache, which it cleans itself; the originals would
    otherwise pile up in the export folder for as long as the server runs. Returns how many went.
    """
    gone = 0
    cutoff = time.time() - max_age_s
    try:
        entries = list(folder.iterdir())
    except OSError:
        return 0
    for f in entries:
        if f.name.startswith(("explanation-", ".explanation-")) and f.suffix in (".zip", ".partial"):
            try:
                if f.stat().st_mtime < cutoff:
                    f.unlink()
                    gone += 1
            except OSError:
                pass
    return gone


def export(s: views.Session, lang: str, ctl: Controls, folder: str | None = None) -> str:
    """Write the current explanation (overlays, per-layer maps, arrays, summary) as one zip."""
    import tempfile

    from .. import analysis
    from ..export import artefacts, write_zip

    if s.exp is None or s.image is None:
        raise UserError(t(lang, "no_image"))
    opts = analysis.RolloutOptions(head_fusion=ctl.fusion, discard_ratio=float(ctl.discard),
                                   start_layer=int(min(ctl.start_layer, s.exp.num_layers - 1)))
    base = Path(folder or os.environ.get("VIT_EXPLORER_EXPORT_DIR") or Path(tempfile.gettempdir()) / "vit-explorer-exports")
    # a random part: two users exporting the same image with different settings at the same moment
    # must not overwrite each other's zip before Gradio has copied it to its cache
    name = f"explanation-{_digest(s.exp.crop.tobytes())[:10]}-q{s.query_token()}-{uuid.uuid4().hex[:8]}.zip"
    prune_exports(base)
    try:
        files = artefacts(s.exp, s.full_image(), opts, s.query_token(), s.model)
        return str(write_zip(files, base / name))
    except ExplorerError as err:
        raise fail(lang, err) from err
