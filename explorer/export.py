"""Write one explanation to disk: rollout overlay, patch grid, per-layer maps, arrays, summary.

Used by ``vit-explorer explain`` (a folder per image) and by the app's download button (one zip).
Files are written under a temporary name and renamed when complete, so a full disk or an
unwritable folder leaves nothing half-written behind.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from . import analysis
from .capture import Explanation
from .errors import ExplorerError
from .render import overlay


class ExportError(ExplorerError):
    """The files could not be written (disk full, folder not writable)."""

    code = "disk"


#: what each array of ``arrays.npz`` holds (written into ``summary.json`` beside its shape)
ARRAYS = {
    "attention": "(layers, heads, tokens, tokens): attention weights, rows (queries) sum to 1; "
                 "tokens in the model's order, prefix tokens (class, distillation, registers) first",
    "tokens": "(layers + 1, tokens, width): token states: the input of the first block, then the "
              "output of each block",
    "logits": "(classes,): the classifier's output",
    "features": "(width,): the pooled features the model ends with (it has no classifier)",
    "rollout": "(tokens,): the attention rollout row of the query token with these rollout settings",
    "attention_distance": "(layers, heads): mean attention distance in pixels of the model's input, "
                          "patch queries to patch keys (ViT paper Fig. 7)",
    "crop": "(height, width, 3): the image as the model saw it, uint8 RGB",
    "inner_attention": "TNT (layers, patches, inner heads, words, words): attention among the pixel "
                       "words inside each patch, rows sum to 1; words row-major over the word grid",
}
#: written into ``summary.json``: how its layer axes count
LAYER_AXES = "index 0 of every layer axis is the first block, which the app calls layer 1"


def artefacts(exp: Explanation, image: np.ndarray, opts: analysis.RolloutOptions, query: int,
              model_name: str) -> dict[str, bytes]:
    """Every file of an explanation, in memory: ``{name: bytes}``."""
    lay = exp.layout
    row = exp.rollout_row(query, opts)
    pmap = analysis.patch_map(row, lay.num_prefix, lay.grid)
    maps = analysis.query_maps(exp.attention, query, lay)

    def png(arr: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()

    # layers counted from 1, as the app names them (layer01.png is the first block)
    named = [("rollout.png", pmap)] + [(f"layer{layer + 1:02d}.png", maps[layer].mean(0))
                                       for layer in range(exp.num_layers)]
    drawn: dict[str, bytes] = {}
    for i in range(0, len(named), 2):  # two overlays a pass over the image; two photo-sized buffers
        pair = named[i:i + 2]
        for (name, _m), img in zip(pair, overlay.overlays(image, [m for _n, m in pair], box=exp.box)):
            drawn[name] = png(img)
    files = {"rollout.png": drawn.pop("rollout.png"),
             "patches.png": png(overlay.patch_grid(overlay.upscale_nearest(exp.crop, 448), lay.grid,
                                                   first_index=lay.num_prefix)),
             "layers_heads.png": png(overlay.tile_maps(maps)), **drawn}
    # a model without a classifier (a DINOv2 backbone) ends with its pooled features
    out_name = "logits" if exp.classifier else "features"
    arrays = {"attention": exp.attention, "tokens": exp.tokens, out_name: exp.logits, "rollout": row,
              "attention_distance": exp.attention_distance(), "crop": exp.crop}
    layout = {"prefix": list(lay.prefix_roles), "grid": list(lay.grid), "patch": list(lay.patch_size)}
    if exp.inner_attention is not None:  # TNT: attention among the words inside each patch
        arrays["inner_attention"] = exp.inner_attention
        layout["word_grid"] = list(analysis.word_grid(exp.inner_attention.shape[-1], tuple(lay.patch_size)))
    files["arrays.npz"] = npz(arrays)
    files["summary.json"] = json.dumps({
        "model": model_name, "family": exp.family,
        "prediction": [{"class": i, "label": lb, "prob": p} for i, lb, p in exp.topk],
        "layout": layout,
        "crop_box": list(exp.box), "image_size": list(exp.image_size), "query": query,
        "rollout": {"head_fusion": opts.head_fusion, "discard_ratio": opts.discard_ratio,
                    "start_layer": opts.start_layer + 1, "start_block_index": opts.start_layer},
        "notes": [c for c, _ in exp.notes],
        "arrays": {name: {"shape": list(a.shape), "dtype": str(a.dtype), "meaning": ARRAYS[name]}
                   for name, a in arrays.items()},
        "layer_axes": LAYER_AXES}, indent=1, ensure_ascii=False).encode()
    return files


def npz(arrays: dict[str, np.ndarray]) -> bytes:
    """The arrays as an ``.npz`` that ``np.load`` reads, deflated at level 1: weights and token
    states are float noise to zlib, which at numpy's level 6 took 2.7× the time for 1 % less
    (1370 tokens: 26 s against 9.5 s for 231 MB)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, a in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)
    return buf.getvalue()


#: entries already compressed: stored in the download as they are (deflating 231 MB of npz again
#: took 6.5 s and saved nothing)
_COMPRESSED = (".png", ".npz")


def _disk_error(err: OSError, where: Path) -> ExportError:
    return ExportError(f"Could not write to {where}: {err.strerror or err}. Nothing was left half-written; "
                       "free some space or choose a writable folder.", code="disk", path=str(where))


def write_folder(files: dict[str, bytes], out: Path) -> Path:
    """Write the files into ``out`` (created), all or nothing."""
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return out
    except OSError as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_error(err, out) from None


def write_zip(files: dict[str, bytes], out: Path) -> Path:
    """Write the files as one zip at ``out``, all or nothing."""
    tmp = out.with_name(f".{out.name}.partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in files.items():
                zf.writestr(name, data, zipfile.ZIP_STORED if name.endswith(_COMPRESSED) else zipfile.ZIP_DEFLATED)
        os.replace(tmp, out)
        return out
    except OSError as err:
        try:  # missing_ok covers a missing file only, not a parent that is a file or unreadable
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise _disk_error(err, out) from None
