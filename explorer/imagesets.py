"""Labelled image sets from folders, file lists and zip archives, read safely.

Labels come from the name of the folder an image sits in. A zip is read in memory, never
extracted: entries with absolute paths or ``..`` are skipped (they would escape any folder they
were extracted to), and the archive is refused when its entries would inflate beyond
``MAX_UNZIPPED_BYTES`` or by more than ``MAX_RATIO`` (a zip bomb).
"""
from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable

from .errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp")
MAX_UNZIPPED_BYTES = 300 * 2**20
MAX_RATIO = 200  # uncompressed / compressed, for the archive as a whole
MAX_ENTRIES = 5000


@dataclass
class ImageSet:
    items: list[bytes | str] = field(default_factory=list)  # image bytes or paths
    labels: list[str] = field(default_factory=list)  # "" when unknown
    names: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # why entries were left out


def _label_of(parts: tuple[str, ...]) -> str:
    return parts[-2] if len(parts) >= 2 else ""


def read_zip(path: str | Path, max_images: int) -> ImageSet:
    out = ImageSet()
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise InputError(f"{Path(path).name} is not a readable zip archive ({err}).", code="bad_zip",
                         why=str(err), reason="unreadable") from None
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if len(infos) > MAX_ENTRIES:
            raise InputError(f"The zip holds {len(infos)} files; at most {MAX_ENTRIES} are read.",
                             code="bad_zip", why=f"{len(infos)} > {MAX_ENTRIES} entries", reason="entries",
                             entries=len(infos), max=MAX_ENTRIES)
        total = sum(i.file_size for i in infos)
        packed = max(1, sum(i.compress_size for i in infos))
        if total > MAX_UNZIPPED_BYTES or total / packed > MAX_RATIO:
            raise InputError(
                f"The zip would unpack to {total / 2**20:.0f} MB from {packed / 2**20:.1f} MB (a zip bomb?); "
                f"at most {MAX_UNZIPPED_BYTES // 2**20} MB and a ratio of {MAX_RATIO}:1 are accepted.",
                code="bad_zip", why=f"{total / 2**20:.0f} MB unpacked", reason="bomb", mb=round(total / 2**20),
                packed_mb=round(packed / 2**20, 1), limit_mb=MAX_UNZIPPED_BYTES // 2**20, ratio=MAX_RATIO)
        for info in infos:
            p = PurePosixPath(info.filename.replace("\\", "/"))
            if p.is_absolute() or ".." in p.parts or info.filename.startswith(("/", "\\")):
                out.skipped.append(f"{info.filename}: path leaves the archive")
                continue
            if p.name.startswith(".") or "__MACOSX" in p.parts or p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if p.name.endswith(".mask.png"):
                continue
            if len(out.items) >= max_images:
                raise InputError(f"The zip holds more than {max_images} images; use a subset.",
                                 code="too_many_images", n=len(out.items) + 1, max=max_images)
            try:
                with zf.open(info) as fh:  # read at most the declared size: a lying header cannot inflate
                    data = fh.read(info.file_size)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as err:
                # zipfile stops at the declared size and then fails the CRC check (bad CRC-32), or the
                # entry is encrypted / uses an unknown method: leave it out, do not fail the whole set
                out.skipped.append(f"{info.filename}: damaged or unreadable entry ({err})")
                continue
            out.items.append(data)
            out.labels.append(_label_of(p.parts))
            out.names.append(str(p))
    return out


def collect(paths: Iterable[str | Path], max_images: int) -> ImageSet:
    """Images from uploaded files and zips (labels from folder names inside zips)."""
    out = ImageSet()
    for raw in paths:
        p = Path(raw)
        if p.suffix.lower() == ".zip":
            sub = read_zip(p, max_images - len(out.items))
            out.items += sub.items
            out.labels += sub.labels
            out.names += sub.names
            out.skipped += sub.skipped
        elif p.suffix.lower() in IMAGE_SUFFIXES and not p.name.endswith(".mask.png"):
            if len(out.items) >= max_images:
                raise InputError(f"More than {max_images} images; use a subset.", code="too_many_images",
                                 n=len(out.items) + 1, max=max_images)
            out.items.append(str(p))
            out.labels.append("")
            out.names.append(p.name)
        else:
            out.skipped.append(f"{p.name}: not an image or zip")
    return out


def from_folder(folder: str | Path, max_images: int) -> ImageSet:
    """Images under ``folder``, labelled by their sub-folder's name."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.endswith(".mask.png"))
    if len(files) > max_images:
        raise InputError(f"{folder} holds {len(files)} images; at most {max_images}.", code="too_many_images",
                         n=len(files), max=max_images)
    out = ImageSet()
    for f in files:
        out.items.append(str(f))
        out.labels.append(f.parent.name if f.parent != folder else "")
        out.names.append(str(f.relative_to(folder)))
    return out
