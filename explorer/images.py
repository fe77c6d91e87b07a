"""Safe image decoding and the model's own preprocessing.

``decode`` turns bytes, a path, a PIL image or an array into an upright RGB ``uint8`` array. It
checks the declared size *before* decoding pixels (a 20000×20000 PNG is a few KB on disk and
1.2 GB in memory), says what it had to do (first frame of an animation, EXIF rotation, 16-bit
rescale, transparency composited) and refuses what it cannot read with a message that says why.

``prepare`` reproduces timm's evaluation transform (resize the shorter side to ``size/crop_pct``,
centre crop, normalise) as one explicit box in the original image, so every overlay can be drawn
exactly over the region the model saw.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageError

#: Largest image accepted, in pixels (a 12-megapixel phone photo is far below; 20000² is not).
MAX_PIXELS = 50_000_000
#: Largest encoded file accepted, in bytes.
MAX_FILE_BYTES = 40 * 1024 * 1024
#: Longest side ratio accepted; beyond it the centre crop would show a sliver of the image.
MAX_ASPECT = 12.0

#: Signatures of formats PIL reads: a file that starts like one but cannot be opened is damaged.
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")

# PIL's own bomb guard raises a bare DecompressionBombError inside whatever opened the file
# (Gradio's upload handling among them); decode() checks the declared size itself, right after
# reading the header and before any pixel is decoded, and says so in the user's language.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False
#: The formats decode() opens (a camera's multi-picture JPEG opens as JPEG). Pillow knows more, and
#: some do work while opening, before the declared size can be checked: an ICO decodes the PNG it
#: holds (119 KB declaring 30000×30000 allocated 860 MB before it was refused); EPS runs Ghostscript.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")


@dataclass
class DecodedImage:
    """An upright RGB image and what decoding had to do to get it."""

    array: np.ndarray  # (H, W, 3) uint8 RGB
    format: str  # "PNG", "JPEG", ... or "array"
    notes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (code, params)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.array.shape[1], self.array.shape[0]


def _sniff_unsupported(head: bytes) -> ImageError | None:
    text = head.lstrip()[:512].lower()
    if b"<svg" in text or (text.startswith(b"<?xml") and b"svg" in head.lower()):
        return ImageError(
            "SVG drawings are not supported: they are vector graphics, not pixels. "
            "Export the drawing as PNG or JPEG and upload that.", code="svg")
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1", b"ftypheis", b"ftyphevc"):
        return ImageError(
            "HEIC/HEIF photos (the iPhone default) cannot be read here. "
            "Export the photo as JPEG (on iPhone: Settings > Camera > Formats > Most Compatible).",
            code="heic")
    if text.startswith((b"<!doctype", b"<html", b"<head", b"<body", b"{", b"[")) or (
            head and all(32 <= b < 127 or b in (9, 10, 13) for b in head[:256])):
        return ImageError(
            "This file is text (HTML, JSON or plain text), not an image, whatever its name says. "
            "Upload a PNG, JPEG, GIF, BMP, TIFF or WebP image.", code="not_image")
    return None


def _read_bytes(source: Any) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "upload"
    path = Path(os.fspath(source))
    if not path.is_file():
        raise ImageError(f"No image file at {path}.", code="no_file", path=str(path))
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ImageError(
            f"{path.name} is {size / 2**20:.0f} MB; images up to {MAX_FILE_BYTES // 2**20} MB are accepted.",
            code="file_too_large", mb=round(size / 2**20), limit=MAX_FILE_BYTES // 2**20)
    return path.read_bytes(), path.name


def _to_rgb(img: Image.Image, notes: list) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit files: scale by the type's range so 65535 is white, not clipped at 255
        top = 65535.0 if (mode.startswith("I;16") or arr.max() > 255) else 255.0
        if mode == "F":
            finite = np.isfinite(arr)
            if not finite.all():  # one NaN made the whole range NaN: the image came out black
                notes.append(("non_finite_pixels", {"count": int(arr.size - finite.sum())}))
                arr = np.where(finite, arr, np.nan)
            lo, hi = (float(np.nanmin(arr)), float(np.nanmax(arr))) if finite.any() else (0.0, 0.0)
            arr = np.nan_to_num((arr - lo) / (hi - lo or 1.0) * 255.0, nan=0.0)
        else:
            arr = arr / top * 255.0
        notes.append(("rescaled_high_bit_depth", {"mode": mode}))
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"))
        if alpha.min() < 255:
            notes.append(("alpha_composited", {}))
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode == "CMYK":
        notes.append(("converted_from_cmyk", {}))
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def decode(source: Any, *, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """Decode any image input into an upright RGB uint8 array, refusing what is unsafe.

    Args:
        source: bytes, a path, a ``PIL.Image`` or an ``(H, W[, C])`` array.
        max_pixels: refuse images that declare more pixels than this, before decoding them.

    Raises:
        ImageError: empty, not an image, unsupported format, too large, damaged.
    """
    notes: list[tuple[str, dict[str, Any]]] = []
    if isinstance(source, np.ndarray):
        return DecodedImage(_array_to_rgb(source, notes), "array", notes)
    if isinstance(source, Image.Image):
        img, fmt = source, source.format or "PIL"
    else:
        data, name = _read_bytes(source)
        if not data:
            raise ImageError("The file is empty (0 bytes). Upload the image again.", code="empty")
        if len(data) > MAX_FILE_BYTES:
            raise ImageError(
                f"The file is {len(data) / 2**20:.0f} MB; images up to {MAX_FILE_BYTES // 2**20} MB are accepted.",
                code="file_too_large", mb=round(len(data) / 2**20), limit=MAX_FILE_BYTES // 2**20)
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError:
            if data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
                raise ImageError("The image file is damaged or cut short: it starts like an image but its "
                                 "header cannot be read. Re-export it and upload it again.",
                                 code="damaged") from None
            raise _sniff_unsupported(data[:4096]) or ImageError(
                "This file is not an image format that can be read here. "
                "Upload a PNG, JPEG, GIF, BMP, TIFF or WebP image.", code="not_image") from None
        except Image.DecompressionBombError:
            raise _too_large(None, max_pixels) from None
        except Exception as err:  # PIL raises assorted errors on malformed headers
            raise ImageError(f"The image header is damaged ({type(err).__name__}). "
                             "Re-export the image and upload it again.", code="damaged") from None
        fmt = img.format or "image"
    w, h = img.size
    if w * h > max_pixels:
        raise _too_large((w, h), max_pixels)
    if w < 1 or h < 1:
        raise ImageError("The image has no pixels.", code="empty")
    frames = int(getattr(img, "n_frames", 1) or 1)
    if frames > 1:
        img.seek(0)
        notes.append(("first_frame", {"frames": frames}))
    try:
        img.load()
        upright = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError:
        raise _too_large((w, h), max_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(
            f"The image file is damaged or cut short ({err}). Re-export it and upload it again.",
            code="damaged") from None
    if upright is not img and upright.size != img.size or _exif_orientation(img) in range(2, 9):
        notes.append(("exif_rotated", {"orientation": _exif_orientation(img)}))
    return DecodedImage(_to_rgb(upright, notes), fmt, notes)


def _exif_orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(0x0112)
    except Exception:
        return None


def _too_large(size: tuple[int, int] | None, max_pixels: int) -> ImageError:
    what = f"{size[0]}×{size[1]} pixels" if size else "more pixels than allowed"
    return ImageError(
        f"Image too large: {what}; at most {max_pixels / 1e6:.0f} megapixels are accepted. "
        "Resize it and upload it again.",
        code="image_too_large", width=size[0] if size else 0, height=size[1] if size else 0,
        limit_mp=round(max_pixels / 1e6))


def _array_to_rgb(arr: np.ndarray, notes: list) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageError(f"An image array must be (H, W), (H, W, 3) or (H, W, 4); got {arr.shape}.",
                         code="bad_array", shape=str(arr.shape))
    if arr.shape[0] * arr.shape[1] > MAX_PIXELS:
        raise _too_large((arr.shape[1], arr.shape[0]), MAX_PIXELS)
    if arr.dtype == np.uint16:
        arr = np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8)
        notes.append(("rescaled_high_bit_depth", {"mode": "uint16"}))
    elif arr.dtype.kind == "f":
        arr = np.clip(np.rint(arr * 255.0 if arr.max() <= 1.0 else arr), 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        a = arr[..., 3:4].astype(np.float32) / 255.0
        arr = np.rint(arr[..., :3] * a + 255.0 * (1 - a)).astype(np.uint8)
        notes.append(("alpha_composited", {}))
    return np.ascontiguousarray(arr)


# ----------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class DataConfig:
    """The evaluation transform of a model (timm's ``pretrained_cfg``)."""

    input_size: tuple[int, int]  # (height, width)
    crop_pct: float = 0.875  # shorter side resized to size / crop_pct, then centre-cropped
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def from_model(cls, model: Any, input_size: tuple[int, int] | None = None) -> "DataConfig":
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
        mode = cfg.get("crop_mode", "center")
        crop = float(cfg.get("crop_pct") or 1.0) if mode in ("center", None) else 1.0
        return cls(
            input_size=tuple(input_size or size),  # type: ignore[arg-type]
            crop_pct=crop,
            interpolation=str(cfg.get("interpolation") or "bicubic"),
            mean=tuple(cfg.get("mean", cls.mean)),  # type: ignore[arg-type]
            std=tuple(cfg.get("std", cls.std)),  # type: ignore[arg-type]
        )


_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
             "lanczos": Image.LANCZOS}


def crop_box(image_hw: tuple[int, int], cfg: DataConfig) -> tuple[float, float, float, float]:
    """The region ``(x0, y0, x1, y1)`` of the original image the model sees, in its pixels.

    timm resizes the shorter side to ``size / crop_pct`` and crops the centre; that is the same as
    cropping a centred box of ``size / scale`` pixels from the original, with
    ``scale = max(th / H, tw / W) / crop_pct``.
    """
    h0, w0 = image_hw
    th, tw = cfg.input_size
    scale = max(th / h0, tw / w0) / cfg.crop_pct
    bw, bh = min(tw / scale, w0), min(th / scale, h0)
    x0, y0 = (w0 - bw) / 2.0, (h0 - bh) / 2.0
    return x0, y0, x0 + bw, y0 + bh


def check_geometry(image_hw: tuple[int, int], cfg: DataConfig,
                   min_patch: int = 1) -> tuple[float, float, float, float]:
    """The crop box of an image of this size, or an ImageError when the model cannot use it:
    an aspect ratio beyond :data:`MAX_ASPECT`, or a crop smaller than one patch. Cheap (no pixels),
    so a set of images can be checked before any of them is resized."""
    h0, w0 = image_hw
    if max(h0, w0) / max(1, min(h0, w0)) > MAX_ASPECT:
        raise ImageError(
            f"The image is {w0}×{h0} pixels, an aspect ratio over {MAX_ASPECT:.0f}:1; the model's "
            "centre crop would show only a sliver of it. Crop it closer to square first.",
            code="extreme_aspect", width=w0, height=h0)
    box = crop_box((h0, w0), cfg)
    if min(box[2] - box[0], box[3] - box[1]) < min_patch:
        raise ImageError(
            f"The image is {w0}×{h0} pixels: smaller than one {min_patch}×{min_patch} patch of this "
            "model. Upload a larger image.", code="too_small", width=w0, height=h0, patch=min_patch)
    return box


@dataclass
class Prepared:
    tensor: Any  # torch.Tensor (1, 3, H, W), normalised
    crop: np.ndarray  # (H, W, 3) uint8: exactly what the model saw, before normalisation
    box: tuple[float, float, float, float]  # that crop in the original image's pixel coordinates


def prepare(image: np.ndarray, cfg: DataConfig, min_patch: int = 1) -> Prepared:
    """Crop, resize and normalise an RGB uint8 image for a model."""
    import torch

    h0, w0 = image.shape[:2]
    box = check_geometry((h0, w0), cfg, min_patch)
    th, tw = cfg.input_size
    pil = Image.fromarray(image)
    crop = pil.resize((tw, th), resample=_RESAMPLE.get(cfg.interpolation, Image.BICUBIC), box=box,
                      reducing_gap=None if max(h0, w0) < 4 * max(th, tw) else 3.0)
    arr = np.array(crop, dtype=np.uint8)
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return Prepared(((t - mean) / std).unsqueeze(0), arr, box)


def patch_count_for(size: int, kernel: int, stride: int) -> int:
    """Patches along one side for a patch embedding with this kernel and stride (no padding)."""
    if kernel > size or stride < 1:
        return 0
    return math.floor((size - kernel) / stride) + 1
