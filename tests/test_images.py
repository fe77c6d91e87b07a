"""Decoding every kind of input safely, and the model's own crop. Inputs are made on the fly."""
from __future__ import annotations

import io
import math
import resource
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from explorer import images
from explorer.errors import ImageError
from explorer.images import DataConfig, crop_box, decode, prepare

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _png(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG", **kw)
    return b.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", **kw)
    return b.getvalue()


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _code(source, **kw) -> str:
    with pytest.raises(ImageError) as ei:
        decode(source, **kw)
    return ei.value.code


# ----------------------------------------------------------------------------- refused inputs


def _png_declaring(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose IHDR claims width x height (CRC fixed up)."""
    data = bytearray(_png(Image.new("RGB", (8, 8), (10, 20, 30))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A valid 8x8 JPEG whose SOF0 header claims width x height."""
    data = bytearray(_jpeg(Image.new("RGB", (8, 8), (10, 20, 30))))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("make", [_png_declaring, _jpeg_declaring], ids=["png", "jpeg"])
def test_decompression_bomb_refused_before_decoding(make, tmp_path):
    bomb = make(20000, 20000)
    assert len(bomb) < 2000
    im = Image.open(io.BytesIO(bomb))
    assert im.size == (20000, 20000)  # the header really declares it
    (tmp_path / "bomb.png").write_bytes(bomb)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for source in (bomb, tmp_path / "bomb.png", str(tmp_path / "bomb.png")):
        t0 = time.perf_counter()
        with pytest.raises(ImageError) as ei:
            decode(source)
        assert time.perf_counter() - t0 < 0.5
        assert ei.value.code == "image_too_large"
        assert ei.value.params["width"] == 20000 and ei.value.params["height"] == 20000
        assert "20000×20000" in str(ei.value)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mb < 200  # decoding would need 1.2 GB


def _ico_holding(png: bytes, declared: int = 0) -> bytes:
    """An ICO file whose one entry is ``png`` (ICO entries may be whole PNG files)."""
    entry = struct.pack("<BBBBHHII", declared, declared, 0, 0, 1, 32, len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def test_icon_holding_a_bomb_is_refused_without_decoding_it():
    """Pillow's ICO reader decodes the PNG inside an icon while opening it, before the declared size
    can be checked: a 30000×30000 PNG inside an icon took 860 MB. decode() opens only the formats
    it names, so an icon is refused as a format it does not read, at once and without the memory."""
    bomb = _ico_holding(_png_declaring(30000, 30000))
    assert len(bomb) < 2000
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    assert _code(bomb) == "not_image"
    assert time.perf_counter() - t0 < 0.5
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024 < 200
    # an ordinary icon is refused the same way, with the list of formats that are read
    with pytest.raises(ImageError, match="PNG, JPEG, GIF, BMP, TIFF or WebP"):
        decode(_ico_holding(_png(Image.new("RGB", (16, 16))), 16))


def test_max_pixels_is_a_parameter():
    data = _png(Image.new("RGB", (100, 100)))
    assert _code(data, max_pixels=9999) == "image_too_large"
    assert decode(data, max_pixels=10000).array.shape == (100, 100, 3)


def test_array_too_large_refused():
    big = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), shape=(8000, 8000, 3), strides=(0, 0, 0))
    with pytest.raises(ImageError) as ei:
        decode(big)
    assert ei.value.code == "image_too_large"


def test_empty_file(tmp_path):
    assert _code(b"") == "empty"
    (tmp_path / "empty.png").write_bytes(b"")
    assert _code(tmp_path / "empty.png") == "empty"


def test_missing_file(tmp_path):
    assert _code(tmp_path / "nope.jpg") == "no_file"


def test_file_too_large(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 1000)
    data = _png(_noise(64, 64))
    assert len(data) > 1000
    (tmp_path / "big.png").write_bytes(data)
    assert _code(tmp_path / "big.png") == "file_too_large"
    assert _code(data) == "file_too_large"


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about a cut-off TIFF's EXIF
@pytest.mark.parametrize("fmt", ["png", "jpeg", "gif", "tiff"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95, 8, 20, 40, 100])
def test_truncated(fmt, keep):
    b = io.BytesIO()
    _noise(64, 64).save(b, fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))
    data = b.getvalue()
    assert decode(data).array.shape == (64, 64, 3)  # the whole file is fine
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    # cut inside the pixels or inside the header: damaged either way, never "not an image"
    assert _code(data[:n]) == "damaged"


def test_damaged_header():
    data = bytearray(_png(_noise(16, 16)))
    data[16:24] = struct.pack(">II", 0, 0)  # a zero-size IHDR, CRC left wrong
    assert _code(bytes(data)) == "damaged"


@pytest.mark.parametrize("content", [
    b"hello, this is just a note that was renamed to photo.png\n",
    b"<!DOCTYPE html>\n<html><head><title>Not Found</title></head><body>404</body></html>\n",
    b'{"error": "not an image"}',
], ids=["text", "html", "json"])
def test_text_named_png(content, tmp_path):
    (tmp_path / "photo.png").write_bytes(content)
    assert _code(tmp_path / "photo.png") == "not_image"
    assert _code(content) == "not_image"


def test_binary_garbage_is_not_image():
    assert _code(bytes(range(256)) * 4) == "not_image"


@pytest.mark.parametrize("content", [
    b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
    b'<?xml version="1.0" encoding="UTF-8"?>\n<!-- drawing -->\n<svg xmlns="http://www.w3.org/2000/svg"></svg>',
], ids=["bare", "xml-prolog"])
def test_svg(content, tmp_path):
    (tmp_path / "drawing.png").write_bytes(content)
    assert _code(tmp_path / "drawing.png") == "svg"


@pytest.mark.parametrize("brand", [b"heic", b"heix", b"mif1"])
def test_heic(brand):
    data = b"\x00\x00\x00\x18ftyp" + brand + b"\x00\x00\x00\x00mif1heic" + bytes(200)
    assert _code(data) == "heic"


def test_bad_arrays():
    with pytest.raises(ImageError) as ei:
        decode(np.zeros((4, 4, 2), np.uint8))
    assert ei.value.code == "bad_array"
    with pytest.raises(ImageError):
        decode(np.zeros((2, 4, 4, 3), np.uint8))


# ----------------------------------------------------------------------------- colour modes


def test_16bit_png_rescaled_not_saturated():
    grad = np.round(np.linspace(0, 65535, 256)).astype(np.uint16)
    arr16 = np.tile(grad, (8, 1))
    data = _png(Image.fromarray(arr16))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    d = decode(data)
    a = d.array
    assert a.dtype == np.uint8 and a.shape == (8, 256, 3)
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])
    row = a[0, :, 0].astype(int)
    assert row.min() == 0 and row.max() == 255
    assert abs(row[128] - 128) <= 1
    assert np.all(np.diff(row) >= 0)  # monotone
    assert (row == 255).sum() <= 2  # not clipped at white
    assert len(np.unique(row)) > 200  # the full range is used
    assert ("rescaled_high_bit_depth", {"mode": Image.open(io.BytesIO(data)).mode}) in d.notes


def test_16bit_rgb_png():
    import cv2

    grad = np.round(np.linspace(0, 65535, 256)).astype(np.uint16)
    bgr = np.zeros((4, 256, 3), np.uint16)
    bgr[..., 2] = grad  # red in OpenCV's BGR order
    bgr[..., 0] = grad[::-1]
    ok, buf = cv2.imencode(".png", bgr)
    assert ok
    a = decode(buf.tobytes()).array
    assert a[0, :, 0].min() == 0 and a[0, :, 0].max() == 255 and abs(int(a[0, 128, 0]) - 128) <= 1
    assert a[0, 0, 2] == 255 and a[0, 255, 2] == 0
    assert np.all(a[..., 1] == 0)


def test_16bit_arrays():
    grad = np.tile(np.round(np.linspace(0, 65535, 256)).astype(np.uint16), (4, 1))
    d = decode(grad)
    assert d.array[0, 0, 0] == 0 and d.array[0, -1, 0] == 255 and abs(int(d.array[0, 128, 0]) - 128) <= 1
    assert d.notes[0][0] == "rescaled_high_bit_depth"
    f = decode(np.linspace(0, 1, 256, dtype=np.float32).reshape(1, 256).repeat(4, 0))
    assert f.array[0, 0, 0] == 0 and f.array[0, -1, 0] == 255


def test_cmyk_jpeg():
    data = _jpeg(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95)  # pure red in CMYK
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    d = decode(data)
    assert d.array.shape == (16, 16, 3)
    r, g, b = d.array[8, 8].astype(int)
    assert r > 230 and g < 25 and b < 25
    assert ("converted_from_cmyk", {}) in d.notes


def test_palette_png_with_transparency():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)  # index 0 black, index 1 green
    img.paste(1, (4, 0, 8, 8))
    data = _png(img, transparency=0)  # index 0 is transparent
    assert Image.open(io.BytesIO(data)).mode == "P"
    d = decode(data)
    assert d.array[2, 2].tolist() == [255, 255, 255]  # transparent -> white, not black
    assert d.array[2, 6].tolist() == [0, 200, 0]
    assert ("alpha_composited", {}) in d.notes


def test_palette_png_without_transparency():
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    d = decode(_png(img))
    assert d.array[0, 0].tolist() == [10, 20, 30] and d.notes == []


def test_grayscale():
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))
    d = decode(_png(Image.fromarray(gray, "L")))
    assert d.array.shape == (4, 16, 3)
    for ch in range(3):
        np.testing.assert_array_equal(d.array[..., ch], gray)
    np.testing.assert_array_equal(decode(gray).array[..., 1], gray)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_composited_on_white(mode):
    if mode == "RGBA":
        img = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
        img.paste((0, 0, 255, 255), (0, 0, 4, 8))
        expect_half = [255, 127, 127]
        expect_opaque = [0, 0, 255]
    else:
        img = Image.new("LA", (8, 8), (0, 128))
        img.paste((100, 255), (0, 0, 4, 8))
        expect_half = [127, 127, 127]
        expect_opaque = [100, 100, 100]
    d = decode(_png(img))
    assert np.abs(d.array[4, 6].astype(int) - expect_half).max() <= 1
    assert d.array[4, 1].tolist() == expect_opaque
    assert ("alpha_composited", {}) in d.notes


def test_rgba_array_composited():
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[..., 0] = 255
    arr[0, 0, 3] = 255  # one opaque red pixel, the rest fully transparent
    d = decode(arr)
    assert d.array[0, 0].tolist() == [255, 0, 0]
    assert d.array[1, 1].tolist() == [255, 255, 255]


def test_opaque_rgba_has_no_note():
    d = decode(_png(Image.new("RGBA", (4, 4), (1, 2, 3, 255))))
    assert d.array[0, 0].tolist() == [1, 2, 3] and d.notes == []


@pytest.mark.parametrize("orientation,top,bottom", [(6, "red", "blue"), (8, "blue", "red"), (3, None, None)])
def test_exif_rotated_jpeg_comes_out_upright(orientation, top, bottom):
    stored = Image.new("RGB", (40, 20), (255, 0, 0))  # wider than tall: left half red
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # right half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    d = decode(_jpeg(stored, exif=exif.tobytes(), quality=95))
    colour = {"red": [255, 0, 0], "blue": [0, 0, 255]}
    if orientation == 3:  # 180 degrees: still wide, blue now on the left
        assert d.array.shape == (20, 40, 3)
        assert np.abs(d.array[10, 5].astype(int) - colour["blue"]).max() < 20
        assert np.abs(d.array[10, 35].astype(int) - colour["red"]).max() < 20
    else:  # 6: rotate 90 degrees clockwise to view (the stored left edge ends up on top); 8: the other way
        assert d.array.shape == (40, 20, 3)  # taller than wide
        assert np.abs(d.array[5, 10].astype(int) - colour[top]).max() < 20
        assert np.abs(d.array[35, 10].astype(int) - colour[bottom]).max() < 20
    assert ("exif_rotated", {"orientation": orientation}) in d.notes


def test_invalid_exif_orientation_gets_no_rotation_note():
    """Orientation 9 is not a valid EXIF value: nothing is rotated, so nothing is said."""
    exif = Image.Exif()
    exif[0x0112] = 9
    d = decode(_jpeg(Image.new("RGB", (40, 20), (0, 128, 0)), exif=exif.tobytes()))
    assert d.array.shape == (20, 40, 3) and d.notes == []


def test_no_exif_no_rotation_note():
    d = decode(_jpeg(Image.new("RGB", (40, 20), (0, 128, 0))))
    assert d.array.shape == (20, 40, 3) and d.notes == []
    assert d.format == "JPEG" and d.size == (40, 20)


def _frames():
    return [Image.new("RGB", (16, 12), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]


def test_animated_gif_first_frame():
    fr = _frames()
    b = io.BytesIO()
    fr[0].save(b, "GIF", save_all=True, append_images=fr[1:], duration=100, loop=0)
    d = decode(b.getvalue())
    assert d.array.shape == (12, 16, 3)
    assert d.array[5, 5].tolist() == [255, 0, 0]
    assert ("first_frame", {"frames": 3}) in d.notes
    assert d.format == "GIF"


def test_multipage_tiff_first_frame():
    fr = _frames()
    b = io.BytesIO()
    fr[0].save(b, "TIFF", save_all=True, append_images=fr[1:])
    d = decode(b.getvalue())
    assert d.array[5, 5].tolist() == [255, 0, 0]
    assert ("first_frame", {"frames": 3}) in d.notes


def test_pil_image_and_path_inputs(tmp_path):
    img = _noise(20, 10)
    np.testing.assert_array_equal(decode(img).array, np.asarray(img))
    img.save(tmp_path / "x.bmp")
    d = decode(tmp_path / "x.bmp")
    np.testing.assert_array_equal(d.array, np.asarray(img))
    assert d.format == "BMP"


# ----------------------------------------------------------------------------- preprocessing


def test_tiny_image_smaller_than_a_patch():
    cfg = DataConfig((64, 64))
    with pytest.raises(ImageError) as ei:
        prepare(np.zeros((8, 8, 3), np.uint8), cfg, min_patch=16)
    assert ei.value.code == "too_small"
    assert ei.value.params["patch"] == 16
    prepare(np.zeros((20, 20, 3), np.uint8), DataConfig((64, 64), crop_pct=1.0), min_patch=16)


def test_tiny_image_through_explain(vit_model):
    import explorer
    with pytest.raises(ImageError) as ei:
        explorer.explain(vit_model, np.zeros((6, 9, 3), np.uint8))
    assert ei.value.code == "too_small"


@pytest.mark.parametrize("hw", [(10, 130), (130, 10), (3, 400)])
def test_extreme_aspect(hw):
    with pytest.raises(ImageError) as ei:
        prepare(np.zeros((*hw, 3), np.uint8), DataConfig((64, 64)), min_patch=16)
    assert ei.value.code == "extreme_aspect"


def test_aspect_at_limit_is_accepted():
    p = prepare(np.zeros((20, 240, 3), np.uint8), DataConfig((64, 64), crop_pct=1.0), min_patch=16)
    assert p.crop.shape == (64, 64, 3)


def _timm_box(h0: int, w0: int, size: int, crop_pct: float) -> tuple[float, float, float, float]:
    """timm's eval transform as torchvision runs it, mapped back to the original image:
    Resize(floor(size / crop_pct)) on the shorter side (longer side truncated), then
    CenterCrop(size) with rounded offsets."""
    s = math.floor(size / crop_pct)
    if h0 <= w0:
        nh, nw = s, int(s * w0 / h0)
    else:
        nh, nw = int(s * h0 / w0), s
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    fx, fy = w0 / nw, h0 / nh
    return left * fx, top * fy, (left + size) * fx, (top + size) * fy


@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
@pytest.mark.parametrize("hw", [(300, 400), (400, 300), (333, 517), (224, 224), (250, 1000), (481, 237)])
def test_crop_box_matches_timm_geometry(crop_pct, hw):
    h0, w0 = hw
    box = crop_box(hw, DataConfig((224, 224), crop_pct))
    ref = _timm_box(h0, w0, 224, crop_pct)
    one_resized_px = max(h0, w0) / (224 / crop_pct) * 1.01  # timm rounds to whole resized pixels
    for a, b in zip(box, ref):
        assert abs(a - b) <= one_resized_px, (box, ref)
    # the continuous geometry exactly: a centred square of short_side * crop_pct
    side = min(h0, w0) * crop_pct
    assert box == pytest.approx(((w0 - side) / 2, (h0 - side) / 2, (w0 + side) / 2, (h0 + side) / 2))


@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
@pytest.mark.parametrize("hw", [(300, 400), (333, 517), (400, 300)])
def test_prepare_pixels_match_timm_transform(crop_pct, hw):
    from timm.data import create_transform

    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 100 * np.sin(xx / 7.0), 128 + 100 * np.sin(yy / 6.0),
                    128 + 100 * np.sin((xx + yy) / 9.0)], -1).astype(np.uint8)
    tf = create_transform(input_size=224, crop_pct=crop_pct, interpolation="bilinear",
                          mean=(0, 0, 0), std=(1, 1, 1))
    ref = tf(Image.fromarray(img)).permute(1, 2, 0).numpy() * 255
    cfg = DataConfig((224, 224), crop_pct, "bilinear", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    p = prepare(img, cfg)
    assert p.crop.shape == (224, 224, 3)
    # a one-pixel shift of the box costs ~9 levels on this pattern; interpolation details ~4
    assert np.abs(ref - p.crop).mean() < 5.0
    # the tensor is the crop, normalised
    np.testing.assert_allclose(p.tensor[0].permute(1, 2, 0).numpy(), p.crop / 255.0, atol=1e-6)


def test_prepare_normalises_with_mean_std():
    cfg = DataConfig((32, 32), 1.0, "bicubic", (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    p = prepare(np.full((40, 40, 3), 255, np.uint8), cfg)
    np.testing.assert_allclose(p.tensor[0, :, 0, 0].numpy(), [1.0, 3.0, 0.5], atol=1e-6)
    assert p.box == (0.0, 0.0, 40.0, 40.0)


def test_non_square_target_box():
    cfg = DataConfig((32, 64), crop_pct=1.0)
    x0, y0, x1, y1 = crop_box((300, 300), cfg)
    assert (x1 - x0, y1 - y0) == pytest.approx((300, 150))
    assert (x0, y0) == pytest.approx((0, 75))


def test_data_config_from_model(vit_model):
    cfg = DataConfig.from_model(vit_model.model)
    assert cfg.crop_pct == pytest.approx(vit_model.model.pretrained_cfg["crop_pct"])
    assert cfg.mean == tuple(vit_model.model.pretrained_cfg["mean"])

    class Fake:
        pretrained_cfg = {"input_size": (3, 48, 48), "crop_mode": "squash", "crop_pct": 0.9}

    assert DataConfig.from_model(Fake()).crop_pct == 1.0  # not a centre crop
    assert DataConfig.from_model(Fake()).input_size == (48, 48)


def test_patch_count_for():
    assert images.patch_count_for(224, 16, 16) == 14
    assert images.patch_count_for(224, 16, 8) == 27
    assert images.patch_count_for(8, 16, 16) == 0


def test_float_tiff_with_a_nan_keeps_its_picture():
    """A 32-bit float TIFF is scaled from its minimum to its maximum; a NaN or infinite pixel made
    that range NaN and the whole image black. Those pixels are black now, the rest is scaled from
    the finite values, and a note says how many there were."""
    ramp = np.tile(np.linspace(0.0, 2.0, 50, dtype=np.float32), (20, 1))
    ramp[3, 4] = np.nan
    ramp[5, 6] = np.inf
    buf = io.BytesIO()
    Image.fromarray(ramp, mode="F").save(buf, format="TIFF")
    d = decode(buf.getvalue())
    assert d.array[0, 0].tolist() == [0, 0, 0] and d.array[0, -1].tolist() == [255, 255, 255]
    assert abs(int(d.array[0, 25, 0]) - round(25 / 49 * 255)) <= 1
    assert d.array[3, 4].tolist() == [0, 0, 0] and d.array[5, 6].tolist() == [0, 0, 0]
    assert ("non_finite_pixels", {"count": 2}) in d.notes
