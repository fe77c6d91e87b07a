"""Labelled image sets from zips, folders and file lists, read without trusting the archive."""
from __future__ import annotations

import io
import os
import struct
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from explorer import imagesets
from explorer.errors import InputError
from explorer.imagesets import collect, from_folder, read_zip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _png(seed: int = 0, size: int = 16) -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(b, "PNG")
    return b.getvalue()


def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def test_labels_from_parent_folder(tmp_path):
    entries = {
        "shapes/train/circle/a.png": _png(1),
        "shapes/train/circle/b.jpg": _png(2),
        "shapes/train/square/c.PNG": _png(3),
        "top.png": _png(4),
        "shapes/readme.txt": b"not an image",
        "shapes/.hidden.png": _png(5),
        "__MACOSX/shapes/._a.png": b"resource fork",
        "shapes/train/circle/a.mask.png": _png(6),
    }
    s = read_zip(_zip(tmp_path / "set.zip", entries), max_images=100)
    assert s.names == ["shapes/train/circle/a.png", "shapes/train/circle/b.jpg",
                       "shapes/train/square/c.PNG", "top.png"]
    assert s.labels == ["circle", "circle", "square", ""]
    assert s.items[0] == entries["shapes/train/circle/a.png"]  # the bytes, unchanged
    assert all(isinstance(x, bytes) for x in s.items)


def test_directory_entries_ignored(tmp_path):
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(zipfile.ZipInfo("cats/"), b"")
        zf.writestr("cats/x.png", _png())
    s = read_zip(path, 10)
    assert s.names == ["cats/x.png"] and s.labels == ["cats"]


def test_path_traversal_entries_skipped(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    entries = {
        "../evil.png": _png(1),
        "../../evil2.png": _png(2),
        "/etc/x.png": _png(3),
        "cats/../../escape.png": _png(4),
        "..\\win_evil.png": _png(5),
        "cats/good.png": _png(6),
    }
    path = tmp_path / "zip" / "t.zip"
    path.parent.mkdir()
    _zip(path, entries)
    assert {i.filename for i in zipfile.ZipFile(path).infolist()} >= {"../evil.png", "/etc/x.png"}
    before = {p for p in tmp_path.rglob("*")}
    s = read_zip(path, 10)
    assert s.names == ["cats/good.png"] and s.labels == ["cats"]
    assert len(s.skipped) == 5 and all("leaves the archive" in why for why in s.skipped)
    assert {p for p in tmp_path.rglob("*")} == before  # nothing extracted anywhere
    assert not Path("/etc/x.png").exists()
    assert not (tmp_path / "evil.png").exists() and not (tmp_path.parent / "evil2.png").exists()


def _deflate_zeros(megabytes: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``megabytes`` MiB of zeros, built from one compressed MiB: after a
    full flush the compressor starts afresh, so every flushed MiB is the same bytes."""
    mib = bytes(2**20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH) == block
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    last = tail.compress(mib) + tail.flush()
    crc = 0
    for _ in range(megabytes):
        crc = zlib.crc32(mib, crc)
    return block * (megabytes - 1) + last, crc


def _handmade_zip(path: Path, name: str, stream: bytes, crc: int, size: int) -> Path:
    """One deflated entry, with honest headers, written byte by byte (zipfile cannot take a
    pre-compressed stream)."""
    fname = name.encode()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(stream), size, len(fname), 0)
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc, len(stream), size,
                          len(fname), 0, 0, 0, 0, 0, 0)
    cd_offset = len(local) + len(fname) + len(stream)
    cd = central + fname
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(cd), cd_offset, 0)
    path.write_bytes(local + fname + stream + cd + end)
    return path


@pytest.fixture(scope="module")
def bomb_400mb(tmp_path_factory) -> Path:
    stream, crc = _deflate_zeros(400)
    return _handmade_zip(tmp_path_factory.mktemp("bomb") / "bomb.zip", "photos/cat.png", stream, crc, 400 * 2**20)


def test_zip_bomb_is_genuine(bomb_400mb):
    size = bomb_400mb.stat().st_size
    assert size < 1_000_000  # < 1 MB on disk
    with zipfile.ZipFile(bomb_400mb) as zf:
        info = zf.infolist()[0]
        assert info.file_size == 400 * 2**20
        with zf.open(info) as fh:  # it really inflates to zeros
            assert fh.read(3 * 2**20) == bytes(3 * 2**20)


def test_zip_bomb_refused_quickly(bomb_400mb):
    t0 = time.perf_counter()
    with pytest.raises(InputError) as ei:
        read_zip(bomb_400mb, max_images=100)
    assert time.perf_counter() - t0 < 1.0
    assert ei.value.code == "bad_zip"
    assert "400 MB" in str(ei.value)


def test_zip_bomb_refused_by_size_alone(bomb_400mb, monkeypatch):
    monkeypatch.setattr(imagesets, "MAX_RATIO", 10**9)  # only the absolute limit left
    with pytest.raises(InputError) as ei:
        read_zip(bomb_400mb, max_images=100)
    assert ei.value.code == "bad_zip"


def test_zip_bomb_written_with_zipfile(tmp_path):
    """The ratio check: 24 MB of zeros written through ZipFile.open(name, "w")."""
    path = tmp_path / "ratio.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("a/ok.png", _png())
        with zf.open("a/zeros.png", "w") as fh:
            chunk = bytes(2**20)
            for _ in range(24):
                fh.write(chunk)
    assert path.stat().st_size < 24 * 2**20 / imagesets.MAX_RATIO
    t0 = time.perf_counter()
    with pytest.raises(InputError) as ei:
        read_zip(path, max_images=100)
    assert time.perf_counter() - t0 < 1.0
    assert ei.value.code == "bad_zip"


def test_too_many_images(tmp_path):
    path = _zip(tmp_path / "many.zip", {f"c/{i}.png": _png(i, 4) for i in range(6)})
    assert len(read_zip(path, max_images=6).items) == 6
    with pytest.raises(InputError) as ei:
        read_zip(path, max_images=5)
    assert ei.value.code == "too_many_images"
    assert ei.value.params["max"] == 5


def test_too_many_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(imagesets, "MAX_ENTRIES", 3)
    path = _zip(tmp_path / "e.zip", {f"{i}.txt": b"x" for i in range(4)})
    with pytest.raises(InputError) as ei:
        read_zip(path, max_images=100)
    assert ei.value.code == "bad_zip"


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 but then nothing", b"just text"])
def test_not_a_zip(tmp_path, content):
    (tmp_path / "x.zip").write_bytes(content)
    with pytest.raises(InputError) as ei:
        read_zip(tmp_path / "x.zip", 10)
    assert ei.value.code == "bad_zip"


def test_truncated_zip(tmp_path):
    data = _zip(tmp_path / "ok.zip", {"a/1.png": _png(1), "b/2.png": _png(2)}).read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as ei:
        read_zip(tmp_path / "cut.zip", 10)
    assert ei.value.code == "bad_zip"


def _patch_entry(data: bytearray, info: zipfile.ZipInfo, field_offset_local: int, field_offset_cd: int,
                 value: int) -> None:
    struct.pack_into("<I", data, info.header_offset + field_offset_local, value)
    cd = data.index(b"PK\x01\x02")  # the first entry's central directory record
    struct.pack_into("<I", data, cd + field_offset_cd, value)


def test_lying_entry_is_skipped_not_fatal(tmp_path):
    path = _zip(tmp_path / "lie.zip", {"cats/a.png": _png(1, 32), "dogs/b.png": _png(2, 32)})
    data = bytearray(path.read_bytes())
    info = zipfile.ZipFile(path).infolist()[0]
    _patch_entry(data, info, 22, 24, 100)  # declares 100 bytes uncompressed; inflates to more
    path.write_bytes(bytes(data))
    s = read_zip(path, 10)
    assert s.names == ["dogs/b.png"] and s.labels == ["dogs"]
    assert len(s.skipped) == 1 and s.skipped[0].startswith("cats/a.png")


def test_corrupt_entry_is_skipped_not_fatal(tmp_path):
    path = _zip(tmp_path / "bad.zip", {"cats/a.png": _png(1, 32), "dogs/b.png": _png(2, 32)})
    data = bytearray(path.read_bytes())
    info = zipfile.ZipFile(path).infolist()[0]
    start = info.header_offset + 30 + len(info.filename)
    for i in range(start + 40, start + 80):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    s = read_zip(path, 10)
    assert s.names == ["dogs/b.png"]
    assert len(s.skipped) == 1 and s.skipped[0].startswith("cats/a.png")


def test_collect_files_and_zips(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(1))
    (tmp_path / "notes.txt").write_text("x")
    z = _zip(tmp_path / "z.zip", {"dogs/1.png": _png(2), "dogs/2.png": _png(3)})
    s = collect([tmp_path / "a.png", tmp_path / "notes.txt", z], max_images=10)
    assert s.items[0] == str(tmp_path / "a.png")
    assert s.labels == ["", "dogs", "dogs"]
    assert s.names == ["a.png", "dogs/1.png", "dogs/2.png"]
    assert s.skipped == ["notes.txt: not an image or zip"]
    with pytest.raises(InputError) as ei:
        collect([tmp_path / "a.png", z], max_images=2)
    assert ei.value.code == "too_many_images"
    with pytest.raises(InputError) as ei:
        collect([z, tmp_path / "a.png"], max_images=2)
    assert ei.value.code == "too_many_images"


def test_from_folder(tmp_path):
    for label in ("circle", "square"):
        (tmp_path / label).mkdir()
        for i in range(2):
            (tmp_path / label / f"{i}.png").write_bytes(_png(i))
    (tmp_path / "circle" / "0.mask.png").write_bytes(_png(9))
    (tmp_path / "loose.jpg").write_bytes(_png(7))
    s = from_folder(tmp_path, max_images=10)
    assert sorted(zip(s.names, s.labels)) == [
        ("circle/0.png", "circle"), ("circle/1.png", "circle"), ("loose.jpg", ""),
        ("square/0.png", "square"), ("square/1.png", "square")]
    with pytest.raises(InputError) as ei:
        from_folder(tmp_path, max_images=4)
    assert ei.value.code == "too_many_images"


def test_zip_images_decode(tmp_path):
    from explorer.images import decode

    s = read_zip(_zip(tmp_path / "d.zip", {"x/a.png": _png(3, 12)}), 5)
    assert decode(s.items[0]).array.shape == (12, 12, 3)
    assert os.listdir(tmp_path) == ["d.zip"]
