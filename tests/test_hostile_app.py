"""Hostile and broken input through the RUNNING app (``python -m explorer serve``), every input
made on the fly: images, checkpoints, model names, t-SNE sets, and faults (hub down or hanging,
disk full, folder not writable, a model that breaks in its forward pass).

Every bad input must get its own clear message, in English and in Chinese, and the app must go
on working for the next request. One server for the module; its model hub is a fake on loopback
whose behaviour the tests switch (refuse / stall), its export folder a symlink they re-point.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _app import running_app
from _hostile import CONTROLS, FakeHub, bomb_png, file_data, noise, png, raw_call, rss_mb, write

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STAR = sorted((ROOT / "assets" / "examples" / "shapes" / "star").glob("star_*[0-9].png"))[0]
PRED = 16  # index of the prediction among /explain's outputs; notes follow it
NOTES = 17
LOAD_STATUS = 5  # /load_model: model, kernel, stride, card, curve, status, then the views


@pytest.fixture(scope="module")
def hub():
    h = FakeHub()
    yield h
    h.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def server(hub, workdir):
    exports = workdir / "exports"
    exports.mkdir()
    (workdir / "export-link").symlink_to(exports)
    with running_app({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url,
                      "VIT_EXPLORER_EXPORT_DIR": str(workdir / "export-link")}) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return Client(server[1], verbose=False)


def explain(client, path, lang="en"):
    return client.predict(handle_file(str(path)), lang, *CONTROLS, 8, 8, api_name="/explain")


def load(client, spec, checkpoint=None, arch="", lang="en", image=None):
    return client.predict(spec, handle_file(str(checkpoint)) if checkpoint else None, arch,
                          handle_file(str(image)) if image else None, lang, *CONTROLS, 8, 8, api_name="/load_model")


def still_works(client, spec="classroom-vit"):
    """The bundled model answers with a real prediction after whatever came before."""
    out = load(client, spec)
    assert f"Loaded **{spec}**" in out[LOAD_STATUS]
    pred = explain(client, STAR)[PRED]
    assert pred["label"] and len(pred["confidences"]) == 5


# ----------------------------------------------------------------------------- images

IMAGE_CASES = {  # name -> (bytes, English message, Chinese message)
    "bomb.png": (lambda: bomb_png(20000, 20000), "Image too large: 20000×20000", "图像太大：20000×20000"),
    "empty.png": (lambda: b"", "empty (0 bytes)", "文件是空的"),
    "truncated.png": (lambda: png(noise(96, 96))[:700], "damaged or cut short", "已损坏或不完整"),
    "page.png": (lambda: b"<!doctype html><html><body>hello</body></html>", "not an image", "不是图像"),
    "drawing.svg": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "SVG", "SVG"),
    "tiny.png": (lambda: png(noise(4, 4)), "smaller than one 8×8 patch", "比模型的一个 8×8 图像块还小"),
    "sliver.png": (lambda: png(noise(8, 300)), "aspect ratio over 12:1", "长宽比超过 12:1"),
}


def test_hostile_images_get_their_message_in_both_languages(client, workdir):
    # the server's first explanation loads the bundled model (4 s here, 10 s under two CPU hogs):
    # done first, so that the time bound below is the refusal's, not the load's
    assert explain(client, STAR)[PRED]["label"]
    for name, (make, en, zh) in IMAGE_CASES.items():
        path = write(workdir / "img", name, make())
        for lang, expected in (("en", en), ("zh-CN", zh)):
            t0 = time.perf_counter()
            with pytest.raises(AppError) as ei:
                explain(client, path, lang)
            assert expected in str(ei.value), (name, lang, str(ei.value))
            assert time.perf_counter() - t0 < 10, name
    assert explain(client, STAR)[PRED]["label"]  # and the next good image works


def test_odd_but_valid_images_work_with_their_note(client, workdir):
    rng = np.random.default_rng(1)
    cmyk = workdir / "img" / "cmyk.jpg"
    Image.fromarray(noise(64, 64)).convert("CMYK").save(cmyk)
    deep = workdir / "img" / "deep.png"
    Image.fromarray(rng.integers(0, 65535, (64, 64)).astype(np.uint16)).save(deep)
    gif = workdir / "img" / "anim.gif"
    frames = [Image.fromarray(np.full((64, 64, 3), v, np.uint8)) for v in (0, 120, 240)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=80)
    for path, en, zh in ((cmyk, "CMYK image converted", "CMYK 图像已转换"),
                         (deep, "High bit-depth image", "高位深图像"),
                         (gif, "first of 3 frames", "3 帧中的第一帧")):
        for lang, expected in (("en", en), ("zh-CN", zh)):
            out = explain(client, path, lang)
            assert expected in out[NOTES] and out[PRED]["label"], (path.name, out[NOTES])


def test_inline_image_bomb_is_refused_before_any_pixel_is_decoded(server):
    """A data: URL skips the upload route; it must still reach the size check undecoded."""
    import base64

    proc, url, _ = server
    data = bomb_png(9000, 9000, rgb=True)  # 243 MB of pixels in 0.2 MB
    before = rss_mb(proc.pid)
    ev = raw_call(url, "explain", [file_data(url="data:image/png;base64," + base64.b64encode(data).decode()),
                                   "en", *CONTROLS, 8, 8])
    assert "Image too large: 9000×9000" in (ev.get("output") or {}).get("error", ""), ev
    assert rss_mb(proc.pid) - before < 150


# ----------------------------------------------------------------------------- checkpoints

class WritesAFile:
    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


class RunsACommand:
    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_pickles_that_would_run_code_are_refused_and_run_nothing(client, workdir):
    planted = workdir / "planted"
    planted.mkdir()
    files = []
    for i, payload in enumerate((WritesAFile(planted / "written.txt"), RunsACommand(planted / "touched.txt"))):
        p = workdir / "ck" / f"evil{i}.pth"
        p.parent.mkdir(exist_ok=True)
        torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": payload}, p)
        files.append(p)
    raw = workdir / "ck" / "evil.bin"  # a bare pickle, not even torch's zip format
    raw.write_bytes(pickle.dumps(RunsACommand(planted / "raw.txt")))
    files.append(raw)
    for p in files:
        for lang, expected in (("en", "was refused: unpickling it would run code"), ("zh-CN", "被拒绝")):
            out = load(client, "vit_tiny_patch16_224", checkpoint=p, lang=lang)
            assert expected in out[LOAD_STATUS], out[LOAD_STATUS]
            assert "weights_only" not in out[LOAD_STATUS]  # torch's advice to turn the check off is not shown
    assert list(planted.iterdir()) == []
    still_works(client)


def _state_dict(arch: str, **kw) -> dict:
    import timm

    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, **kw).state_dict()


def test_checkpoints_that_do_not_fit(client, workdir):
    ck = workdir / "ck"
    ck.mkdir(exist_ok=True)
    tiny = ck / "tiny_vit.pth"
    torch.save(_state_dict("vit_tiny_patch16_224", img_size=32, depth=1), tiny)
    # another architecture
    out = load(client, "vit_tiny_patch16_224", checkpoint=tiny, arch="tnt_s_patch16_224")
    assert "does not fit the architecture tnt_s_patch16_224" in out[LOAD_STATUS]
    assert "之前的模型（classroom-vit）仍然可用" in load(client, "vit_tiny_patch16_224", checkpoint=tiny,
                                                     arch="tnt_s_patch16_224", lang="zh-CN")[LOAD_STATUS]
    # a bundled model brings its own weights: the file must not be silently ignored
    out = load(client, "classroom-vit", checkpoint=tiny)
    assert "needs the timm architecture" in out[LOAD_STATUS]
    # truncated
    small7 = ck / "small7.pth"
    torch.save(_state_dict("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=7), small7)
    cut = ck / "cut.pth"
    cut.write_bytes(small7.read_bytes()[: small7.stat().st_size // 2])
    assert "looks truncated" in load(client, "vit_tiny_patch16_224", checkpoint=cut)[LOAD_STATUS]
    assert "文件似乎被截断" in load(client, "vit_tiny_patch16_224", checkpoint=cut, lang="zh-CN")[LOAD_STATUS]
    # a head whose weight and bias disagree on the number of classes
    sd = torch.load(small7, weights_only=True)
    sd["head.bias"] = torch.zeros(10)
    odd = ck / "odd_head.pth"
    torch.save(sd, odd)
    assert "head.bias (10,) vs (7,)" in load(client, "vit_tiny_patch16_224", checkpoint=odd)[LOAD_STATUS]
    still_works(client)


def test_checkpoint_with_another_number_of_classes_loads_with_its_head(client, workdir):
    full = workdir / "ck" / "full7.pth"
    full.parent.mkdir(exist_ok=True)
    torch.save(_state_dict("vit_tiny_patch16_224", num_classes=7), full)
    out = load(client, "vit_tiny_patch16_224", checkpoint=full, image=STAR)
    assert "Loaded **vit_tiny_patch16_224 + full7.pth**" in out[LOAD_STATUS]
    pred = explain(client, STAR)[PRED]
    assert len(pred["confidences"]) == 5 and all(c["label"].startswith("class ") for c in pred["confidences"])
    assert {int(c["label"].split()[1]) for c in pred["confidences"]} <= set(range(7))
    still_works(client)


def test_checkpoint_over_the_upload_limit_is_refused(client, workdir):
    big = workdir / "ck" / "huge.pth"
    big.parent.mkdir(exist_ok=True)
    with open(big, "wb") as fh:  # sparse: 51 MB on the wire, nothing on disk
        fh.truncate(51 * 2**20)
    t0 = time.perf_counter()
    with pytest.raises(Exception) as ei:
        load(client, "vit_tiny_patch16_224", checkpoint=big)
    assert time.perf_counter() - t0 < 15
    assert "413" in str(ei.value) or "large" in str(ei.value).lower() or "size" in str(ei.value).lower()
    big.unlink()
    still_works(client)


# ----------------------------------------------------------------------------- model names

def test_model_names(client, hub):
    out = load(client, "vit_base_patch16_2244")
    assert "is not a timm model name" in out[LOAD_STATUS] and "Did you mean" in out[LOAD_STATUS]
    for name in ("resnet18", "convnext_tiny", "swin_tiny_patch4_window7_224"):
        out = load(client, name)
        assert "not a family this explorer supports" in out[LOAD_STATUS]
        assert "ViT, DeiT" in out[LOAD_STATUS] and "TNT" in out[LOAD_STATUS]
    assert "支持：ViT、DeiT" in load(client, "resnet18", lang="zh-CN")[LOAD_STATUS]
    assert out[0]["value"] == "classroom-vit"  # the picker goes back to the model still loaded


@pytest.mark.parametrize("mode", ["refuse", "stall"])
def test_names_that_need_the_hub_fail_fast_while_it_is_down_or_hanging(client, hub, mode):
    hub.mode = mode
    try:
        for spec, lang, expected in (("deit_small_patch16_224.fb_in1k", "en", "cannot be reached"),
                                     ("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", "zh-CN", "无法连接模型库")):
            t0 = time.perf_counter()
            out = load(client, spec, lang=lang)
            took = time.perf_counter() - t0
            assert expected in out[LOAD_STATUS] and "classroom" in out[LOAD_STATUS], out[LOAD_STATUS]
            assert took < 8, f"{spec}: {took:.1f} s with the hub in mode {mode}"
        assert explain(client, STAR)[PRED]["label"]  # the cached model keeps working
    finally:
        hub.mode = "refuse"


# ----------------------------------------------------------------------------- t-SNE sets

def tsne(client, files, lang="en"):
    return client.predict("upload", 5, 6, [handle_file(str(f)) for f in files], "label", False, lang,
                          api_name="/tsne")


def test_tsne_sets(client, workdir):
    d = workdir / "tsne"
    d.mkdir()
    one = write(d, "a.png", png(noise(64, 64, 1)))
    two = write(d, "b.png", png(noise(80, 50, 2)))
    for files, n in (([one], 1), ([one, two], 2)):
        with pytest.raises(AppError, match=f"at least 5 images; got {n}"):
            tsne(client, files)
    with pytest.raises(AppError, match="至少需要 5 张图像；现在只有 2 张"):
        tsne(client, [one, two], "zh-CN")
    # mixed sizes, plus a tiny image that is left out and named
    mixed = [one, two] + [write(d, f"m{i}.png", png(noise(40 + 30 * i, 90 - 10 * i, i))) for i in range(4)]
    mixed.append(write(d, "speck.png", png(noise(3, 3))))
    fig, text = tsne(client, mixed)
    assert "6 images embedded" in text and "speck.png" in text and "smaller than one" in text
    # more than the maximum
    many = d / "many.zip"
    small = png(noise(8, 8))
    with zipfile.ZipFile(many, "w") as z:
        for i in range(2001):
            z.writestr(f"c/{i}.png", small)
    with pytest.raises(AppError, match="more than 2000 images"):
        tsne(client, [many])
    # nested folders: labels from the innermost folder
    nested = d / "nested.zip"
    with zipfile.ZipFile(nested, "w") as z:
        for i in range(8):
            z.writestr(f"set/deep/er/{'cats' if i % 2 else 'dogs'}/{i}.png", png(noise(48 + 4 * i, 64, 10 + i)))
    fig, text = tsne(client, [nested])
    assert "8 images embedded" in text
    assert {"cats", "dogs"} <= {tr.get("name") for tr in json.loads(fig["plot"])["data"]}
    # ../ and absolute entries: left out, reported, and nothing written anywhere
    escape = workdir / "escaped.png"
    trav = d / "trav.zip"
    with zipfile.ZipFile(trav, "w") as z:
        z.writestr("../../../../../../" + str(escape).lstrip("/"), png(noise()))
        z.writestr(str(workdir / "abs.png"), png(noise()))
        for i in range(5):
            z.writestr(f"ok/{i}.png", png(noise(64, 64, 30 + i)))
    fig, text = tsne(client, [trav])
    assert "5 images embedded" in text and "2 file(s) left out" in text and "path leaves the archive" in text
    assert not escape.exists() and not (workdir / "abs.png").exists()
    # a zip bomb
    bomb = d / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x/big.png", b"\0" * (400 * 2**20))
    for lang, expected in (("en", "zip bomb"), ("zh-CN", "zip 炸弹")):
        with pytest.raises(AppError, match=expected):
            tsne(client, [bomb], lang)
    small_trav = d / "small_trav.zip"  # too few left: the refusal names what was left out, in Chinese
    with zipfile.ZipFile(small_trav, "w") as z:
        z.writestr("../up.png", png(noise()))
        z.writestr("ok/1.png", png(noise(64, 64, 50)))
    with pytest.raises(AppError, match="现在只有 1 张。 有 1 个文件被跳过：../up.png \\(路径指向压缩包之外\\)"):
        tsne(client, [small_trav], "zh-CN")


# ----------------------------------------------------------------------------- faults

def _point(link: Path, target: Path) -> None:
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def _mount_full_tmpfs(where: Path) -> bool:
    where.mkdir(exist_ok=True)
    if shutil.which("mount") is None:
        return False
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(where)],
                        capture_output=True).returncode == 0
    if ok:
        (where / "filler").write_bytes(b"\0" * 24 * 1024)
    return ok


def test_export_with_a_full_disk_or_unwritable_folder(client, workdir):
    link, good = workdir / "export-link", workdir / "exports"
    explain(client, STAR)
    out = client.predict("en", "mean", 0.0, 1, 0.55, True, api_name="/export")
    assert Path(out["value"]).suffix == ".zip" and len(list(good.glob("explanation-*.zip"))) == 1

    blocker = workdir / "a-file"
    blocker.write_text("not a folder")
    cases = [(blocker / "exports", "not writable")]
    full = workdir / "full"
    mounted = _mount_full_tmpfs(full)
    if mounted:
        cases.append((full, "disk full"))
    try:
        for target, what in cases:
            _point(link, target)
            for lang, expected in (("en", "Could not write"), ("zh-CN", "无法保存文件")):
                with pytest.raises(AppError, match=expected):
                    client.predict(lang, "mean", 0.0, 1, 0.55, True, api_name="/export")
            if target.is_dir():
                assert sorted(p.name for p in target.iterdir()) == ["filler"], what  # nothing half-written
    finally:
        _point(link, good)
        if mounted:
            subprocess.run(["umount", str(full)], capture_output=True)
    out = client.predict("en", "mean", 0.0, 1, 0.55, True, api_name="/export")
    assert Path(out["value"]).suffix == ".zip"
    if not mounted:
        pytest.skip("could not mount a tiny tmpfs: the disk-full case was not run (the unwritable one was)")


def test_a_model_that_breaks_in_its_forward_pass(client, workdir):
    """A local-dir model whose input size is not a multiple of its patch: it builds, then raises in
    every forward pass. The message says so, the server stays up, the next request works."""
    import timm

    from explorer import zoo

    args = dict(img_size=30, patch_size=8, depth=1, embed_dim=48, num_heads=2, num_classes=3)
    folder = workdir / "broken-model"
    zoo.save_local_dir(timm.create_model("vit_tiny_patch16_224", pretrained=False, **args), folder,
                       model_args=args)
    assert "Loaded" in load(client, f"local-dir:{folder}")[LOAD_STATUS]
    for lang, expected in (("en", "forward pass failed"), ("zh-CN", "前向传播失败")):
        with pytest.raises(AppError, match=expected):
            explain(client, STAR, lang)
    still_works(client)


def test_every_error_code_has_a_chinese_message():
    """Whatever refuses an input says so in the user's language: every ``code="..."`` raised
    anywhere in the package has an entry in ERRORS_ZH (variants "code.reason" count for their code)."""
    import re

    from explorer.app.i18n import ERRORS_ZH

    raised = set()
    for f in (ROOT / "explorer").rglob("*.py"):
        raised |= set(re.findall(r'code="([a-z_]+)"', f.read_text(encoding="utf-8")))
    known = {k.split(".")[0] for k in ERRORS_ZH}
    assert raised - known == set()


@pytest.mark.parametrize("env, allowed", [({}, True), ({"SPACE_ID": "someone/explorer"}, False),
                                          ({"SPACE_ID": "someone/explorer", "VIT_EXPLORER_LOCAL_DIRS": "1"}, True),
                                          ({"VIT_EXPLORER_LOCAL_DIRS": "0"}, False)],
                         ids=["local", "space", "space-opted-in", "opted-out"])
@pytest.mark.parametrize("lang", ["en", "zh-CN"])
def test_server_folders_can_be_closed_to_visitors(monkeypatch, tmp_path, env, allowed, lang):
    """On a public Space a visitor may not name server folders ('local-dir:'), which would let the
    error messages tell which folders exist; locally it stays open. Either way the previous model
    is said to be still loaded."""
    from explorer.app import handlers
    from explorer.app.i18n import t

    for k in ("SPACE_ID", "VIT_EXPLORER_LOCAL_DIRS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for spec, arch in ((f"local-dir:{tmp_path}", None), ("vit_tiny_patch16_224", f"LOCAL-DIR:{tmp_path}")):
        with pytest.raises(handlers.UserError) as ei:
            handlers.load(spec, "weights.pth" if arch else None, arch, lang, previous="classroom-vit")
        text = str(ei.value)
        assert (t(lang, "local_dir_off") in text) != allowed
        assert "classroom-vit" in text


def test_inline_images_are_left_to_gradios_cache_cleaner(tmp_path, monkeypatch):
    """An image sent inline (a data: URL) is written to the cache as it came; it is registered with
    the app's temp files, so the cleaner behind ``delete_cache`` removes it like any upload
    (unregistered, a script could fill the disk at the request rate)."""
    import base64

    import gradio as gr
    from gradio.data_classes import FileData
    from gradio.route_utils import delete_files_created_by_app

    from explorer.app.ui import UploadedImage

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    with gr.Blocks() as demo:
        comp = UploadedImage(type="filepath")
    comp.GRADIO_CACHE = str(tmp_path)
    data = b"not an image at all " * 1000
    path = comp.preprocess(FileData(url="data:image/png;base64," + base64.b64encode(data).decode(), path=""))
    assert open(path, "rb").read() == data and path in comp.temp_files
    delete_files_created_by_app(demo, None)
    assert not os.path.exists(path)
