"""Every model source, every checkpoint shape, the offline paths, the cache and the families."""
from __future__ import annotations

import json
import os
import pickle
import time

import numpy as np
import pytest
import timm
import torch

import explorer
from explorer import families, zoo
from explorer.errors import CheckpointError, HubUnreachableError, ModelSourceError

from conftest import FAMILIES, build

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCH = "vit_tiny_patch16_224"
SMALL = dict(img_size=64, depth=2)
LABELS5 = ["daisy", "dandelion", "rose", "sunflower", "tulip"]


@pytest.fixture(autouse=True)
def _empty_cache(clean_cache):
    yield


def _fixed_input(size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randn(2, 3, size, size, generator=g)


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(x)


def _finetuned(num_classes: int = 5, seed: int = 1) -> torch.nn.Module:
    """A ViT-Ti 'fine-tuned' to ``num_classes`` (random weights, distinct per seed)."""
    torch.manual_seed(seed)
    return timm.create_model(ARCH, pretrained=False, num_classes=num_classes, **SMALL).eval()


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------- sources


def test_timm_name_random_weights():
    m = explorer.load_model(ARCH, pretrained=False, **SMALL)
    assert m.source == "random"
    assert m.family == "vit"
    assert m.name == ARCH
    assert not m.model.training
    assert m.facts.layers == 2 and m.facts.grid == (4, 4) and m.facts.tokens == 17
    assert m.data_config.input_size == (64, 64)
    assert len(m.label_names) == 1000  # the default ImageNet head
    assert m.label_names[0] != "class 0"  # ImageNet names from timm's label files


def test_local_dir_round_trip(tmp_path):
    net = _finetuned()
    data_cfg = dict(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), crop_pct=1.0, interpolation="bilinear",
                    input_size=(3, 64, 64))
    zoo.save_local_dir(net, tmp_path / "m", model_args=dict(num_classes=5, **SMALL), label_names=LABELS5,
                       data_cfg=data_cfg)
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "model.safetensors").is_file()

    m = explorer.load_model("local-dir:" + str(tmp_path / "m"))
    assert m.source == "local-dir"
    assert m.label_names == LABELS5
    assert m.data_config.crop_pct == 1.0
    assert m.data_config.interpolation == "bilinear"
    assert tuple(m.data_config.mean) == pytest.approx((0.1, 0.2, 0.3))
    assert tuple(m.data_config.std) == pytest.approx((0.4, 0.5, 0.6))
    assert m.data_config.input_size == (64, 64)
    _assert_same_weights(net, m.model)
    x = _fixed_input()
    assert torch.allclose(_logits(net, x), _logits(m.model, x), atol=1e-6)


def test_local_dir_without_config(tmp_path):
    with pytest.raises(ModelSourceError) as ei:
        explorer.load_model("local-dir:" + str(tmp_path))
    assert ei.value.code == "no_config"


def test_local_dir_weights_that_do_not_fit_config(tmp_path):
    zoo.save_local_dir(_finetuned(), tmp_path / "m", model_args=dict(num_classes=5, **SMALL))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_args"]["depth"] = 3  # the weights hold 2 blocks
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as ei:
        explorer.load_model("local-dir:" + str(tmp_path / "m"))
    assert ei.value.code == "checkpoint_mismatch"


def _make_assets(root, notes: dict | None = None) -> torch.nn.Module:
    net = _finetuned(seed=7)
    zoo.save_local_dir(net, root / "classroom-vit", model_args=dict(num_classes=5, **SMALL),
                       label_names=LABELS5, data_cfg=dict(crop_pct=1.0, input_size=(3, 64, 64)))
    if notes is not None:
        (root / "classroom-vit" / "training.json").write_text(json.dumps(notes))
    return net


def test_bundled_short_name_via_env(tmp_path, monkeypatch):
    net = _make_assets(tmp_path, notes={"val_acc": 0.93, "epochs": 4})
    monkeypatch.setenv("VIT_EXPLORER_ASSETS", str(tmp_path))
    m = explorer.load_model("classroom-vit")
    assert m.source == "bundled"
    assert m.name == "classroom-vit"
    assert m.label_names == LABELS5
    assert m.notes == {"val_acc": 0.93, "epochs": 4}
    assert m.data_config.crop_pct == 1.0
    _assert_same_weights(net, m.model)


def test_bundled_short_name_via_assets_dir(tmp_path, monkeypatch):
    net = _make_assets(tmp_path)
    monkeypatch.delenv("VIT_EXPLORER_ASSETS", raising=False)
    monkeypatch.setattr(zoo, "assets_dir", lambda: tmp_path)
    m = explorer.load_model("classroom-vit")
    assert m.source == "bundled" and m.notes == {}
    _assert_same_weights(net, m.model)


def test_bundled_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_EXPLORER_ASSETS", str(tmp_path))
    with pytest.raises(ModelSourceError) as ei:
        explorer.load_model("classroom-tnt")
    assert ei.value.code == "bundled_missing"
    assert "classroom-tnt" in str(ei.value)


def test_empty_spec():
    with pytest.raises(ModelSourceError) as ei:
        explorer.load_model("   ")
    assert ei.value.code == "empty_spec"


# ----------------------------------------------------------------------------- checkpoints


def _save(obj, path):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(obj, str(path))
    else:
        torch.save(obj, str(path))


WRAPPINGS = {
    "bare": lambda sd: sd,
    "model": lambda sd: {"model": sd, "epoch": 3},
    "state_dict": lambda sd: {"state_dict": sd, "optimizer_name": "adamw"},
    "module.": lambda sd: {"module." + k: v for k, v in sd.items()},
    "_orig_mod.": lambda sd: {"_orig_mod." + k: v for k, v in sd.items()},
}
CASES = [(suffix, w) for suffix in (".pth", ".pt", ".bin") for w in WRAPPINGS]
CASES += [(".safetensors", w) for w in ("bare", "module.", "_orig_mod.")]  # flat tensors only


@pytest.mark.parametrize("suffix,wrapping", CASES)
def test_checkpoint_shapes(tmp_path, suffix, wrapping):
    net = _finetuned(num_classes=5, seed=3)
    sd = {k: v.clone().contiguous() for k, v in net.state_dict().items()}
    path = tmp_path / f"flowers{suffix}"
    _save(WRAPPINGS[wrapping](sd), path)

    m = explorer.load_model(ARCH, checkpoint=path, **SMALL)
    assert m.source == "checkpoint"
    assert m.name == f"{ARCH} + flowers{suffix}"
    assert m.model.num_classes == 5  # read from head.weight
    assert m.label_names == [f"class {i}" for i in range(5)]
    _assert_same_weights(net, m.model)
    x = _fixed_input()
    assert torch.allclose(_logits(net, x), _logits(m.model, x), atol=1e-6)


def test_checkpoint_nested_wrapper(tmp_path):
    net = _finetuned(seed=4)
    path = tmp_path / "ck.pth"
    torch.save({"model": {"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}}, path)
    m = explorer.load_model(ARCH, checkpoint=path, **SMALL)
    _assert_same_weights(net, m.model)


def test_checkpoint_labels_from_sidecar_txt(tmp_path):
    net = _finetuned()
    torch.save(net.state_dict(), tmp_path / "flowers.pth")
    (tmp_path / "labels.txt").write_text("\n".join(LABELS5) + "\n\n", encoding="utf-8")
    m = explorer.load_model(ARCH, checkpoint=tmp_path / "flowers.pth", **SMALL)
    assert m.label_names == LABELS5
    assert m.model.num_classes == 5


def test_checkpoint_labels_from_stem_sidecar(tmp_path):
    net = _finetuned()
    torch.save(net.state_dict(), tmp_path / "flowers.pth")
    (tmp_path / "flowers.labels.txt").write_text("\n".join(LABELS5), encoding="utf-8")
    (tmp_path / "labels.txt").write_text("\n".join("abcde"), encoding="utf-8")  # the stem's wins
    m = explorer.load_model(ARCH, checkpoint=tmp_path / "flowers.pth", **SMALL)
    assert m.label_names == LABELS5


def test_checkpoint_labels_from_config_json(tmp_path):
    net = _finetuned()
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": ARCH, "label_names": LABELS5}))
    m = explorer.load_model(ARCH, checkpoint=tmp_path / "model.safetensors", **SMALL)
    assert m.label_names == LABELS5


def test_checkpoint_label_count_mismatch_falls_back(tmp_path):
    torch.save(_finetuned().state_dict(), tmp_path / "flowers.pth")
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")  # 3 names for 5 classes
    m = explorer.load_model(ARCH, checkpoint=tmp_path / "flowers.pth", **SMALL)
    assert m.label_names == [f"class {i}" for i in range(5)]


def test_explicit_label_names_win(tmp_path):
    torch.save(_finetuned().state_dict(), tmp_path / "flowers.pth")
    (tmp_path / "labels.txt").write_text("\n".join("abcde"))
    m = explorer.load_model(ARCH, checkpoint=tmp_path / "flowers.pth", label_names=LABELS5, **SMALL)
    assert m.label_names == LABELS5


class _OpenFile:
    """Unpickling this would create (truncate) a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class _Shell:
    """Unpickling this would run a shell command that creates a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


@pytest.mark.parametrize("payload", [_OpenFile, _Shell])
@pytest.mark.parametrize("how", ["torch.save", "torch.save legacy", "raw pickle"])
@pytest.mark.parametrize("suffix", [".pth", ".bin"])
def test_malicious_pickle_refused_and_not_run(tmp_path, payload, how, suffix):
    victim = tmp_path / "pwned.txt"
    evil = {"head.weight": torch.zeros(5, 192), "x": payload(victim)}
    path = tmp_path / f"evil{suffix}"
    if how == "torch.save":
        torch.save(evil, path)
    elif how == "torch.save legacy":
        torch.save(evil, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(evil, protocol=2))
    assert not victim.exists()
    with pytest.raises(CheckpointError) as ei:
        explorer.load_model(ARCH, checkpoint=path, **SMALL)
    assert ei.value.code == "unsafe_pickle"
    assert "Nothing in it was run" in str(ei.value)
    assert not victim.exists(), "unpickling ran the payload"


def test_checkpoint_of_another_architecture(tmp_path):
    torch.manual_seed(0)
    other = timm.create_model("vit_small_patch16_224", pretrained=False, **SMALL)  # width 384, not 192
    torch.save(other.state_dict(), tmp_path / "small.pth")
    with pytest.raises(CheckpointError) as ei:
        explorer.load_model(ARCH, checkpoint=tmp_path / "small.pth", **SMALL)
    err = ei.value
    assert err.code == "checkpoint_mismatch"
    assert err.params["arch"] == ARCH
    assert "wrong shape" in str(err)
    assert "(1, 1, 384) vs (1, 1, 192)" in str(err)  # cls_token, as read vs as built
    assert "more)" in str(err)  # many keys: the list is capped


def test_checkpoint_mismatch_lists_missing_unexpected_misshaped(tmp_path):
    sd = dict(_finetuned().state_dict())
    del sd["norm.weight"]
    sd["extra_head.weight"] = torch.zeros(3, 3)
    sd["blocks.1.norm1.bias"] = torch.zeros(100)
    torch.save(sd, tmp_path / "ck.pt")
    with pytest.raises(CheckpointError) as ei:
        explorer.load_model(ARCH, checkpoint=tmp_path / "ck.pt", **SMALL)
    msg = str(ei.value)
    assert ei.value.code == "checkpoint_mismatch"
    assert "1 missing: norm.weight" in msg
    assert "1 unexpected: extra_head.weight" in msg
    assert "1 wrong shape: blocks.1.norm1.bias (100,) vs (192,)" in msg


def test_checkpoint_that_does_not_fit_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    """The architecture's skeleton is built on the meta device and compared with the checkpoint
    first: a tiny file named as ViT-H weights is refused without allocating ViT-H (632M
    parameters; ViT-g would take 7 GB). A fitting checkpoint is then built for real."""
    builds = []
    real = timm.create_model

    def recording(*args, **kwargs):
        builds.append(str(torch.empty(0).device))  # the device models are being built on
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", recording)
    torch.save({"head.weight": torch.zeros(3, 8), "head.bias": torch.zeros(3)}, tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError) as ei:
        zoo.load_model("vit_huge_patch14_224", checkpoint=tmp_path / "tiny.pth", use_cache=False)
    assert ei.value.code == "checkpoint_mismatch" and builds == ["meta"]
    builds.clear()
    torch.save(_finetuned(seed=1).state_dict(), tmp_path / "fits.pth")
    builds.clear()
    zoo.load_model(ARCH, checkpoint=tmp_path / "fits.pth", use_cache=False, **SMALL)
    assert builds == ["meta", "cpu"]


def test_backbone_checkpoint_without_a_head_loads_as_a_feature_model(tmp_path):
    """A checkpoint saved without its classifier is a feature backbone: it is built without a head
    (num_classes=0) and explains with no classes, instead of being refused for head.weight."""
    net = _finetuned(seed=1)
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith("head")}
    torch.save(sd, tmp_path / "backbone.pth")
    m = zoo.load_model(ARCH, checkpoint=tmp_path / "backbone.pth", use_cache=False, **SMALL)
    assert m.model.num_classes == 0
    exp = explorer.explain(m, np.full((64, 64, 3), 120, np.uint8))
    assert exp.topk == [] and exp.logits.shape == (net.embed_dim,)


def test_checkpoint_with_nan_weights_is_refused(tmp_path):
    """A diverged run's weights load and then explain every image as NaN: refused, naming where."""
    sd = _finetuned(seed=1).state_dict()
    sd["blocks.0.mlp.fc1.weight"][3, 5] = float("nan")
    sd["head.bias"][0] = float("inf")
    torch.save(sd, tmp_path / "diverged.pth")
    with pytest.raises(CheckpointError) as ei:
        zoo.load_model(ARCH, checkpoint=tmp_path / "diverged.pth", use_cache=False, **SMALL)
    assert ei.value.code == "checkpoint_not_finite" and ei.value.params["n"] == 2
    assert "blocks.0.mlp.fc1.weight" in str(ei.value) and "head.bias" in str(ei.value)


def test_tnt_checkpoint_into_vit(tmp_path):
    torch.manual_seed(0)
    tnt = timm.create_model("tnt_s_patch16_224", pretrained=False, img_size=64, depth=1, num_classes=5)
    torch.save(tnt.state_dict(), tmp_path / "tnt.pth")
    with pytest.raises(CheckpointError) as ei:
        explorer.load_model(ARCH, checkpoint=tmp_path / "tnt.pth", **SMALL)
    msg = str(ei.value)
    assert ei.value.code == "checkpoint_mismatch"
    assert " missing: " in msg and " unexpected: " in msg
    assert "pixel_embed" in msg or "patch_pos" in msg or "blocks.0.attn_in" in msg


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("keep", [0.5, 0.9, 16])
def test_truncated_checkpoint(tmp_path, suffix, keep):
    full = tmp_path / f"full{suffix}"
    _save({k: v.contiguous() for k, v in _finetuned().state_dict().items()}, full)
    data = full.read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[:n])
    with pytest.raises(CheckpointError) as ei:
        explorer.load_model(ARCH, checkpoint=cut, **SMALL)
    assert ei.value.code == "checkpoint_damaged"


def test_checkpoint_missing_and_bad_suffix(tmp_path):
    with pytest.raises(CheckpointError) as ei:
        zoo.read_checkpoint(tmp_path / "nope.pth")
    assert ei.value.code == "no_file"
    (tmp_path / "w.h5").write_bytes(b"\x89HDF")
    with pytest.raises(CheckpointError) as ei:
        zoo.read_checkpoint(tmp_path / "w.h5")
    assert ei.value.code == "checkpoint_suffix"


def test_compressed_checkpoint_is_refused_before_it_expands(tmp_path):
    """torch.load inflates deflated zip entries: a 100-MB tensor of zeros rewritten with compression
    is a file of about 100 KB. It is refused from the zip's directory, before anything is
    inflated; the same weights as torch.save writes them (stored) load."""
    import resource
    import zipfile

    stored = tmp_path / "zeros.pth"
    torch.save({"blob": torch.zeros(25 * 2**20)}, stored)  # 100 MB, stored uncompressed
    packed = tmp_path / "packed.pth"
    with zipfile.ZipFile(stored) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert packed.stat().st_size < 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError) as ei:
        zoo.read_checkpoint(packed)
    assert ei.value.code == "checkpoint_too_large" and ei.value.params["reason"] == "expands"
    assert ei.value.params["mb"] == 100 and "would expand to 100 MB" in str(ei.value)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024 < 50  # nothing inflated
    assert zoo.read_checkpoint(stored)["blob"].shape == (25 * 2**20,)


def test_checkpoint_of_very_many_tensors_is_refused_from_its_directory(tmp_path, monkeypatch):
    """Each storage is read on its own: a file of 100,000 tiny tensors held the model slot for 20 s.
    The zip's directory tells how many there are before anything is read."""
    monkeypatch.setattr(zoo, "MAX_TENSORS", 50)
    torch.save({f"t{i}": torch.zeros(1) for i in range(51)}, tmp_path / "many.pth")
    with pytest.raises(CheckpointError) as ei:
        zoo.read_checkpoint(tmp_path / "many.pth")
    assert ei.value.code == "checkpoint_too_large" and ei.value.params["n"] == 51
    torch.save({f"t{i}": torch.zeros(1) for i in range(50)}, tmp_path / "enough.pth")
    assert len(zoo.read_checkpoint(tmp_path / "enough.pth")) == 50


def test_torchscript_file_is_named_as_such(tmp_path):
    """A TorchScript archive renamed .pth: said to be one, with what to save instead (torch.load's
    own error is advice about weights_only)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script/save are deprecated
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.pth")
    with pytest.raises(CheckpointError) as ei:
        zoo.read_checkpoint(tmp_path / "scripted.pth")
    assert ei.value.code == "torchscript" and "state_dict" in str(ei.value)


def test_checkpoint_without_tensors(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError) as ei:
        zoo.read_checkpoint(tmp_path / "meta.pth")
    assert ei.value.code == "not_state_dict"
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError) as ei:
        zoo.read_checkpoint(tmp_path / "list.pth")
    assert ei.value.code == "not_state_dict"


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("spec", ["hf-hub:../../etc/passwd", "hf-hub:a b", "hf-hub:org/repo/extra", "hf-hub:",
                                  "hf-hub:" + "a" * 97 + "/b", "hf_hub:org--x/y", "hf-hub:org/re..po"])
def test_malformed_hub_repo_gets_its_own_message(spec):
    """huggingface_hub refuses a malformed repo id with an exception of its own, which reached the
    user as "something went wrong"; the explorer checks the id first and says what one looks like."""
    with pytest.raises(ModelSourceError) as ei:
        zoo.load_model(spec)
    assert ei.value.code == "bad_repo" and "hf-hub:owner/name" in str(ei.value)


@pytest.mark.parametrize("spec", ["vit_tiny_patch16_224.no_such_tag", "vit_tiny_patch16_224."])
def test_unknown_weights_tag_is_a_missing_pretrained_weights_message(spec):
    with pytest.raises(ModelSourceError) as ei:
        zoo.load_model(spec)
    assert ei.value.code == "no_pretrained" and "has no pretrained weights" in str(ei.value)


def test_unknown_model_with_suggestion():
    with pytest.raises(ModelSourceError) as ei:
        explorer.load_model("vit_tinny_patch16_224", pretrained=False)
    assert ei.value.code == "unknown_model"
    assert "Did you mean" in str(ei.value)
    assert "vit_tiny_patch16_224" in str(ei.value)


def test_unknown_model_far_from_anything():
    with pytest.raises(ModelSourceError) as ei:
        explorer.load_model("qqqqqqqqqqqqqqqqq", pretrained=False)
    assert ei.value.code == "unknown_model"
    assert "Did you mean" not in str(ei.value)
    assert "local-dir:" in str(ei.value)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "swin_tiny_patch4_window7_224"])
def test_non_vit_family(name):
    with pytest.raises(ModelSourceError) as ei:
        explorer.load_model(name, pretrained=False)
    assert ei.value.code == "unsupported_family"
    msg = str(ei.value)
    for fam in ("ViT", "DeiT", "TNT"):
        assert fam in msg


def test_family_of_rejects_other_modules():
    with pytest.raises(ModelSourceError) as ei:
        families.family_of(torch.nn.Linear(2, 2))
    assert ei.value.code == "unsupported_family"


# ----------------------------------------------------------------------------- the hub


def _refuse_hub(monkeypatch):
    import huggingface_hub.constants as hc
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hc, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setattr(zoo, "_cached_hub_file", lambda repo: None)  # no weights cached locally


def test_pretrained_hub_unreachable_fails_fast(monkeypatch):
    _refuse_hub(monkeypatch)
    assert zoo.hub_reachable() is False
    t0 = time.perf_counter()
    with pytest.raises(HubUnreachableError) as ei:
        explorer.load_model(ARCH, pretrained=True, **SMALL)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0
    assert ei.value.code == "hub_unreachable"
    msg = str(ei.value)
    assert "local-dir:" in msg and "classroom-vit" in msg and "checkpoint" in msg


def test_pretrained_hub_offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(zoo, "_cached_hub_file", lambda repo: None)
    t0 = time.perf_counter()
    with pytest.raises(HubUnreachableError):
        explorer.load_model("deit_tiny_patch16_224.fb_in1k", **SMALL)
    assert time.perf_counter() - t0 < 5.0


def test_hf_hub_spec_unreachable(monkeypatch):
    _refuse_hub(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(HubUnreachableError) as ei:
        explorer.load_model("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k")
    assert time.perf_counter() - t0 < 5.0
    assert "local-dir:" in str(ei.value)


def test_hf_hub_with_checkpoint_is_refused(tmp_path):
    torch.save(_finetuned().state_dict(), tmp_path / "a.pth")
    with pytest.raises(ModelSourceError) as ei:
        explorer.load_model("hf-hub:timm/x", checkpoint=tmp_path / "a.pth")
    assert ei.value.code == "bad_combination"


def test_no_pretrained_weights_for_name(monkeypatch):
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: None)
    with pytest.raises(ModelSourceError) as ei:
        explorer.load_model(ARCH, pretrained=True, **SMALL)
    assert ei.value.code == "no_pretrained"


# ----------------------------------------------------------------------------- the cache


def test_cache_returns_same_object(clean_cache):
    a = explorer.load_model(ARCH, pretrained=False, **SMALL)
    b = explorer.load_model(ARCH, pretrained=False, **SMALL)
    c = explorer.load_model(ARCH, pretrained=False, img_size=64, depth=1)
    d = explorer.load_model(ARCH, pretrained=False, use_cache=False, **SMALL)
    assert a is b
    assert c is not a and len(c.model.blocks) == 1
    assert d is not a


def test_cache_is_bounded_lru(clean_cache, monkeypatch):
    monkeypatch.setattr(clean_cache, "size", 2)
    m1 = explorer.load_model(ARCH, pretrained=False, img_size=32, depth=1)
    m2 = explorer.load_model(ARCH, pretrained=False, img_size=48, depth=1)
    assert explorer.load_model(ARCH, pretrained=False, img_size=32, depth=1) is m1  # m1 now most recent
    m3 = explorer.load_model(ARCH, pretrained=False, img_size=64, depth=1)  # evicts m2
    assert len(clean_cache.items) == 2
    assert explorer.load_model(ARCH, pretrained=False, img_size=32, depth=1) is m1
    assert explorer.load_model(ARCH, pretrained=False, img_size=64, depth=1) is m3
    again = explorer.load_model(ARCH, pretrained=False, img_size=48, depth=1)
    assert again is not m2
    assert len(clean_cache.items) == 2


def test_cache_key_tracks_checkpoint_file(tmp_path, clean_cache):
    path = tmp_path / "ck.pth"
    torch.save(_finetuned(seed=1).state_dict(), path)
    a = explorer.load_model(ARCH, checkpoint=path, **SMALL)
    assert explorer.load_model(ARCH, checkpoint=path, **SMALL) is a
    net2 = _finetuned(seed=2)
    torch.save(net2.state_dict(), path)
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    b = explorer.load_model(ARCH, checkpoint=path, **SMALL)
    assert b is not a
    _assert_same_weights(net2, b.model)


def test_model_outlives_its_deleted_checkpoint_file(tmp_path, clean_cache):
    """A server's upload cache deletes an uploaded checkpoint after an hour; the model built from it
    is still in the cache and keeps answering (the newest one built from that path). Never built
    or pushed out: the file's absence is reported."""
    path = tmp_path / "ck.pth"
    torch.save(_finetuned(seed=1).state_dict(), path)
    a = explorer.load_model(ARCH, checkpoint=path, **SMALL)
    net2 = _finetuned(seed=2)
    torch.save(net2.state_dict(), path)
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    b = explorer.load_model(ARCH, checkpoint=path, **SMALL)
    path.unlink()
    assert explorer.load_model(ARCH, checkpoint=path, **SMALL) is b is not a
    with pytest.raises(CheckpointError) as ei:  # other settings were never built from it
        explorer.load_model(ARCH, checkpoint=path, img_size=64, depth=1)
    assert ei.value.code == "no_file"
    clean_cache.clear()
    with pytest.raises(CheckpointError):
        explorer.load_model(ARCH, checkpoint=path, **SMALL)


# ----------------------------------------------------------------------------- families


@pytest.mark.parametrize("key", list(FAMILIES))
def test_family_layouts(key):
    name, kwargs, roles, patch = FAMILIES[key]
    m = build(key)
    assert families.prefix_roles(m.model) == roles
    assert m.facts.prefix_roles == roles
    assert families.patch_size(m.model) == (patch, patch)
    side = kwargs["img_size"] // patch
    assert families.default_grid(m.model) == (side, side)
    assert families.default_input_size(m.model) == (kwargs["img_size"],) * 2
    layout = families.layout_for(m.model, (kwargs["img_size"],) * 2)
    assert layout.num_tokens == len(roles) + side * side
    assert m.facts.tokens == layout.num_tokens
    assert m.facts.layers == kwargs["depth"]
    assert m.family == ("tnt" if key == "tnt" else "vit")
    assert len(families.attention_modules(m.model)) == kwargs["depth"]
    assert len(families.inner_attention_modules(m.model)) == (kwargs["depth"] if key == "tnt" else 0)


def test_family_details():
    deit = build("deit_distilled")
    assert deit.facts.prefix_roles == ("cls", "dist")
    layout = families.layout_for(deit.model, (64, 64))
    assert layout.token_label(0) == "class" and layout.token_label(1) == "distillation"
    assert layout.token_label(2) == "patch (0, 0)" and layout.token_label(17) == "patch (3, 3)"

    reg = build("reg4")
    layout = families.layout_for(reg.model, (56, 56))
    assert [layout.token_label(i) for i in range(5)] == [
        "class", "register 1", "register 2", "register 3", "register 4"]
    assert reg.facts.pos_embed == "learned (patches only)"  # no_embed_class
    assert reg.model.pos_embed.shape[1] == 16

    dino = build("dinov2")
    assert dino.facts.patch_size == (14, 14)
    assert dino.facts.pos_embed == "learned (incl. prefix)"  # timm's DINOv2 keeps a class row
    assert dino.model.pos_embed.shape[1] == 17
    assert families.position_embeddings(dino.model)["patch"].shape == (16, 96)

    vit = build("vit")
    assert vit.facts.pos_embed == "learned (incl. prefix)"
    pos = families.position_embeddings(vit.model)["patch"]
    assert torch.equal(pos, vit.model.pos_embed[0, 1:])  # the class row dropped

    gap = build("gap")
    layout = families.layout_for(gap.model, (64, 64))
    assert layout.prefix_roles == () and not layout.has_class_token
    assert layout.default_query() == layout.token_of_patch(2, 2)

    tnt = build("tnt")
    assert tnt.family == "tnt"
    assert tnt.facts.inner["pixel_grid"] == (4, 4)
    assert families.layout_for(tnt.model, (64, 64)).inner_grid == (4, 4)
    pe = families.position_embeddings(tnt.model)
    assert pe["patch"].shape == (16, tnt.model.embed_dim)
    assert pe["pixel"].shape == (16, tnt.facts.inner["width"])
    assert not families.supports_dynamic_size(tnt.model)


def test_unsupported_block_type():
    net = timm.create_model(ARCH, pretrained=False, img_size=32, depth=1)
    net.blocks[0].attn = torch.nn.Identity()
    with pytest.raises(ModelSourceError) as ei:
        families.family_of(net)
    assert ei.value.code == "unsupported_block"


def test_token_layout_geometry():
    layout = families.TokenLayout(("cls", "reg", "reg"), (3, 5), (14, 14))
    assert layout.num_prefix == 3 and layout.num_patches == 15 and layout.num_tokens == 18
    assert layout.input_size == (42, 70)
    for r in range(3):
        for c in range(5):
            t = layout.token_of_patch(r, c)
            assert layout.patch_of_token(t) == (r, c)
    assert layout.patch_of_token(2) is None
    assert layout.default_query() == 0
