"""Every model source behind one entry point, :func:`load_model`.

Specs it accepts::

    "classroom-vit"                                   a bundled offline model (assets/)
    "vit_base_patch16_224.augreg2_in21k_ft_in1k"      a timm name (pretrained weights from the hub)
    "hf-hub:timm/vit_small_patch16_224.augreg_in21k"  a hub repo in timm's format
    "local-dir:/path/to/folder"                       config.json + model.safetensors on disk
    load_model("vit_base_patch16_224", checkpoint="flowers.pth")   a checkpoint file + architecture

Pretrained weights need the model hub. When it cannot be reached the call fails in a few
seconds (timm alone retries for ~46 s) with a message naming the offline alternatives.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
import pickle
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from . import families
from .errors import CheckpointError, HubUnreachableError, ModelSourceError
from .images import DataConfig

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
#: Short names of the models the project trains and ships (see explorer.classroom).
BUNDLED = {"classroom-vit": "classroom-vit", "classroom-tnt": "classroom-tnt"}
#: Curated timm names offered in the app's model picker.
CURATED = [
    "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "vit_small_patch16_224.augreg_in21k_ft_in1k",
    "deit_small_patch16_224.fb_in1k",
    "deit_small_distilled_patch16_224.fb_in1k",
    "vit_small_patch14_dinov2.lvd142m",
    "vit_small_patch14_reg4_dinov2.lvd142m",
    "tnt_s_patch16_224",
]
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
MAX_CHECKPOINT_BYTES = 2 * 2**30
HUB_TIMEOUT_S = 3.0
#: Test/benchmark switch: with ``VIT_EXPLORER_RANDOM_WEIGHTS=1`` in the environment, timm names
#: (the curated picker entries among them) build with random weights (``pretrained=False``) instead
#: of downloading them, so the soak test (:mod:`explorer.soak`) can cycle through every curated
#: architecture offline. Bundled, ``local-dir:``, ``hf-hub:`` and checkpoint sources are unaffected.
#: Never set it on a real deployment: predictions are meaningless.
RANDOM_WEIGHTS_ENV = "VIT_EXPLORER_RANDOM_WEIGHTS"


def assets_dir() -> Path:
    """Where bundled models live (``$VIT_EXPLORER_ASSETS`` overrides, e.g. for tests)."""
    return Path(os.environ.get("VIT_EXPLORER_ASSETS", ASSETS))


@dataclass(eq=False)
class LoadedModel:
    """A built model in eval mode and what the explorer needs to know about it."""

    model: nn.Module
    name: str  # the spec it was loaded from
    source: str  # "bundled", "timm", "hf-hub", "local-dir", "checkpoint", "random"
    family: str  # "vit" or "tnt"
    label_names: list[str]
    data_config: DataConfig
    facts: families.ModelFacts
    notes: dict[str, Any] = field(default_factory=dict)  # e.g. a bundled model's training record

    @property
    def lock(self) -> threading.Lock:
        from .capture import model_lock
        return model_lock(self.model)


# ----------------------------------------------------------------------------- the cache

class _Cache:
    """A small LRU of built models: building ViT-B takes ~0.6 s and users switch back and forth."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple) -> LoadedModel | None:
        with self.lock:
            m = self.items.get(key)
            if m is not None:
                self.items.move_to_end(key)
            return m

    def put(self, key: tuple, m: LoadedModel) -> None:
        with self.lock:
            self.items[key] = m
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)

    def latest(self, match: Any) -> LoadedModel | None:
        """The most recently used model whose key satisfies ``match(key)``."""
        with self.lock:
            for key in reversed(self.items):
                if match(key):
                    self.items.move_to_end(key)
                    return self.items[key]
        return None

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


CACHE = _Cache(int(os.environ.get("VIT_EXPLORER_MODEL_CACHE", "3")))


# ----------------------------------------------------------------------------- the hub

def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the model hub answers an HTTP request within about ``timeout`` seconds.

    A TCP connection is not enough: a hub (or a proxy in front of it) that accepts connections
    and then never answers makes huggingface_hub retry with back-off for minutes. Any HTTP status,
    even an error, counts as an answer; silence, a refused or a dropped connection do not.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        from huggingface_hub import constants
        endpoint = constants.ENDPOINT
    except Exception:
        return False
    if not urlparse(endpoint).hostname:
        return False
    import urllib.error
    import urllib.request

    result: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(endpoint.rstrip("/") + "/api/models?limit=1",
                                                               method="HEAD"), timeout=timeout):
                result.append(True)
        except urllib.error.HTTPError:
            result.append(True)  # it answered
        except Exception:  # URLError, timeouts, resets, bad status lines
            result.append(False)

    # the socket timeout bounds each read; the thread join bounds a server that trickles bytes
    th = threading.Thread(target=probe, name="hub-probe", daemon=True)
    th.start()
    th.join(timeout + 0.5)
    return bool(result and result[0])


def _offline_message(what: str) -> str:
    return (f"The model hub cannot be reached, so {what} cannot be downloaded. Offline you can use "
            f"the bundled models ({', '.join(BUNDLED)}), a folder with 'local-dir:/path' "
            "(config.json + model.safetensors), or a checkpoint file with its architecture name.")


def _cached_hub_file(repo_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        path = try_to_load_from_cache(repo_id, fname)
        if isinstance(path, str):
            return path
    return None


# ----------------------------------------------------------------------------- names

def _is_timm_name(spec: str) -> bool:
    return bool(spec) and spec not in BUNDLED and not spec.startswith(("local-dir:", "hf-hub:", "hf_hub:"))


def _arch_and_tag(name: str) -> tuple[str, str]:
    from timm.models import split_model_name_tag
    return split_model_name_tag(name)


def check_architecture(name: str) -> str:
    """The family (``vit``/``tnt``) of a timm architecture name, or a clear error."""
    import timm
    from timm.models import get_arch_name

    arch, _ = _arch_and_tag(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelSourceError(
            f"'{name}' is not a timm model name.{hint} Use a timm ViT/DeiT/TNT name, "
            f"a bundled model ({', '.join(BUNDLED)}), 'hf-hub:org/repo' or 'local-dir:/path'.",
            code="unknown_model", name=name)
    module = _model_module(get_arch_name(arch))
    family = families.SUPPORTED_TIMM_MODULES.get(module)
    if family is None:
        raise ModelSourceError(
            f"'{name}' is a {module} model, not a family this explorer supports. "
            "Supported: ViT, DeiT (incl. distilled), register and DINOv2-style ViTs, and TNT.",
            code="unsupported_family", name=name, module=module)
    return family


def _model_module(arch: str) -> str:
    from timm.models import _registry
    return _registry._model_to_module.get(arch, "?")


# ----------------------------------------------------------------------------- checkpoints

_WRAPPER_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "module", "state_dict_ema",
                 "model_ema", "net", "weights")
_PREFIXES = ("module.", "_orig_mod.", "model.")


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat state dict from a checkpoint file, loading pickles with ``weights_only=True``.

    Raises:
        CheckpointError: missing, too large, truncated, unsafe (would run code), or not weights.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint file at {path}.", code="no_file", path=str(path))
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(
            f"{path.name} is {size / 2**30:.1f} GB; checkpoints up to {MAX_CHECKPOINT_BYTES / 2**30:.0f} GB "
            "are accepted.", code="checkpoint_too_large")
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(
            f"{path.name}: checkpoint files must end in {', '.join(CHECKPOINT_SUFFIXES)}.",
            code="checkpoint_suffix", name=path.name)
    _check_zip(path, size)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file
            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message starts with advice to retry with weights_only=False: show the line that
        # names what the file wanted to build ("unsupported GLOBAL posix.system ..."), not that
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "GLOBAL" in ln or "nsupported" in ln), lines[0] if lines else "")
        raise CheckpointError(
            f"{path.name} was refused: unpickling it would run code or build objects other than "
            f"tensors ({why[:160]}). Nothing in it was run. Save the weights "
            "alone (torch.save(model.state_dict(), ...)) or as .safetensors.",
            code="unsafe_pickle", name=path.name) from None
    except Exception as err:
        raise CheckpointError(
            f"{path.name} could not be read: it looks truncated or is not a checkpoint "
            f"({type(err).__name__}: {str(err)[:160]}).", code="checkpoint_damaged", name=path.name) from None
    return _flatten_state_dict(obj, path.name)


#: A zip checkpoint (torch.save's format) may expand at most this many times its size when its
#: entries are compressed; torch.save itself stores them uncompressed (about 1×).
MAX_EXPANSION = 8
#: At most this many tensors in a zip checkpoint (ViT-g/14 has about 600).
MAX_TENSORS = 20_000


def _check_zip(path: Path, size: int) -> None:
    """Refuse, from a zip checkpoint's directory alone: a TorchScript archive; more than
    ``MAX_TENSORS`` tensors; entries that would expand past the size limit, or far past the file's
    own size, before torch inflates them in memory (torch.load reads deflated entries too, and a
    1-MB file of zeros took 1 GiB: a 50-MB upload would have taken tens of GB)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # torch.load will say the file is damaged
    if any(i.filename.endswith("constants.pkl") or "/code/__torch__/" in i.filename for i in infos):
        # torch.load's own message for these is advice about weights_only, which would not help
        raise CheckpointError(
            f"{path.name} is a TorchScript model (torch.jit.save), not a state dict of weights. Save "
            "the weights alone (torch.save(model.state_dict(), ...)) or as .safetensors.",
            code="torchscript", name=path.name)
    tensors = sum(1 for i in infos if "/data/" in i.filename and not i.filename.endswith("/"))
    if tensors > MAX_TENSORS:
        # each storage is read on its own: 100,000 tiny ones held the model slot for 20 s
        raise CheckpointError(
            f"{path.name} holds {tensors:,} tensors; a ViT-family checkpoint has hundreds (ViT-g about "
            f"600), and at most {MAX_TENSORS:,} are read.", code="checkpoint_too_large", reason="tensors",
            name=path.name, n=tensors, max=MAX_TENSORS)
    expanded = sum(max(0, info.file_size) for info in infos)
    if expanded > MAX_CHECKPOINT_BYTES or (expanded > 64 * 2**20 and expanded > MAX_EXPANSION * size):
        raise CheckpointError(
            f"{path.name} would expand to {expanded / 2**20:,.0f} MB in memory from a {size / 2**20:,.1f}-MB "
            f"file (compressed entries); checkpoints as torch.save writes them are not compressed. "
            f"Save it again with torch.save or as .safetensors.",
            code="checkpoint_too_large", reason="expands", name=path.name, mb=round(expanded / 2**20),
            file_mb=round(size / 2**20, 1))


def _flatten_state_dict(obj: Any, name: str) -> dict[str, torch.Tensor]:
    for _ in range(3):  # {"model": {"state_dict": ...}} happens
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"{name} holds a {type(obj).__name__}, not a state dict of tensors.",
                              code="not_state_dict", name=name)
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{name} holds no tensors.", code="not_state_dict", name=name)
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _infer_num_classes(sd: dict[str, torch.Tensor]) -> int | None:
    w = sd.get("head.weight")
    if w is None:
        w = sd.get("head.fc.weight")
    return int(w.shape[0]) if w is not None and w.ndim == 2 else None


def read_label_names(folder: Path, stem: str | None = None) -> list[str] | None:
    """Label names beside a checkpoint: ``<stem>.labels.txt``, ``labels.txt``, ``labels.json``,
    ``class_names.txt`` or ``config.json`` (``label_names``)."""
    cands = ([folder / f"{stem}.labels.txt", folder / f"{stem}.labels.json"] if stem else [])
    cands += [folder / n for n in ("labels.txt", "class_names.txt", "labels.json", "config.json")]
    for p in cands:
        if not p.is_file():
            continue
        try:
            if p.suffix == ".txt":
                names = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
            else:
                data = json.loads(p.read_text(encoding="utf-8"))
                if isinstance(data, dict):
                    data = data.get("label_names") or data.get("labels") or data.get(
                        "pretrained_cfg", {}).get("label_names")
                    if isinstance(data, dict):  # {"0": "daisy", ...}
                        data = [data[k] for k in sorted(data, key=lambda s: int(s))]
                names = [str(n) for n in data] if isinstance(data, list) else []
        except (ValueError, OSError, KeyError, TypeError):
            continue
        if names:
            return names
    return None


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], name: str, arch: str) -> None:
    fitted = _fitted(model, sd, name, arch)
    # weights of a diverged training run load fine and then explain every image as NaN (the
    # prediction panel showed no numbers and the maps nothing): refused here, saying where
    bad = [k for k, v in fitted.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""
        raise CheckpointError(
            f"{name} holds NaN or infinite weights in {len(bad)} tensor(s): {', '.join(bad[:4])}{more}. "
            "The training run that saved it probably diverged; use an earlier checkpoint.",
            code="checkpoint_not_finite", name=name, n=len(bad), where=", ".join(bad[:4]) + more)
    model.load_state_dict(fitted, strict=True)


def _fitted(model: nn.Module, sd: dict[str, torch.Tensor], name: str, arch: str) -> dict[str, torch.Tensor]:
    """``sd`` made to fit ``model`` (position embeddings resampled, old layouts converted), or a
    CheckpointError naming what is missing, unexpected or misshaped. Only shapes are read from
    ``model``, so it may be a skeleton on the meta device."""
    fam = families.family_of(model)
    if fam == "vit":
        from timm.models.vision_transformer import checkpoint_filter_fn
        try:  # resamples position embeddings trained at another size, converts old layouts
            sd = checkpoint_filter_fn(sd, model)
        except Exception:  # leave it as it is; the strict check below explains any mismatch
            pass
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    misshaped = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                 for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or misshaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if keys:
                more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:4])}{more}")
        raise CheckpointError(
            f"{name} does not fit the architecture {arch}: " + "; ".join(parts) +
            ". Check that the architecture name matches the one the checkpoint was trained with.",
            code="checkpoint_mismatch", name=name, arch=arch, detail="; ".join(parts))
    return sd


# ----------------------------------------------------------------------------- loading

def device() -> torch.device:
    """``$VIT_EXPLORER_DEVICE`` if set, else the GPU when there is one, else the CPU."""
    want = os.environ.get("VIT_EXPLORER_DEVICE")
    if want:
        return torch.device(want)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _finish(model: nn.Module, name: str, source: str, labels: list[str] | None,
            notes: dict | None = None) -> LoadedModel:
    from .capture import label_names_for
    model.eval().to(device())
    family = families.family_of(model)
    # every image is decoded to RGB: a model built for 1 or 4 channels would fail on the first image
    # with a tensor-shape error, so refuse it here and say why
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and conv.in_channels != 3:
        raise ModelSourceError(
            f"{name} takes images with {conv.in_channels} channel(s); the explorer feeds RGB images "
            "(3 channels). Use a model trained on RGB images.", code="not_rgb", name=name,
            channels=conv.in_channels)
    num_classes = getattr(model, "num_classes", 0) or 0
    if labels is None or len(labels) != num_classes:
        labels = label_names_for(model, num_classes) if num_classes else []
    return LoadedModel(model, name, source, family, labels, DataConfig.from_model(model, families.default_input_size(model)),
                       families.model_facts(model), notes or {})


def load_model(spec: str, *, pretrained: bool = True, checkpoint: str | os.PathLike | None = None,
               label_names: list[str] | None = None, use_cache: bool = True,
               hub_timeout: float = HUB_TIMEOUT_S, **model_kwargs: Any) -> LoadedModel:
    """Build a model from any supported source, in eval mode, cached.

    Args:
        spec: a bundled short name, a timm name, ``hf-hub:org/repo`` or ``local-dir:/path``.
        pretrained: load weights (False: random weights, for tests, benchmarks and sanity checks).
        checkpoint: a ``.safetensors/.pth/.pt/.bin`` file whose weights fit ``spec``'s
            architecture; the number of classes is read from its head.
        label_names: class names (otherwise from the checkpoint's sidecar, its config, ImageNet).
        use_cache: reuse a model built from the same arguments.
        hub_timeout: seconds to wait for the hub before failing.
        **model_kwargs: passed to ``timm.create_model`` (``img_size``, ``dynamic_img_size``, ...).

    Raises:
        ModelSourceError, HubUnreachableError, CheckpointError.
    """
    spec = str(spec).strip()
    if pretrained and os.environ.get(RANDOM_WEIGHTS_ENV, "") == "1" and _is_timm_name(spec):
        pretrained = False  # test/benchmark switch: see RANDOM_WEIGHTS_ENV
    ck = Path(checkpoint) if checkpoint else None
    ck_id = (str(ck.resolve()), ck.stat().st_mtime_ns, ck.stat().st_size) if ck and ck.is_file() else None
    key = (spec, pretrained, ck_id, tuple(label_names or ()), tuple(sorted(model_kwargs.items())))
    if use_cache:
        hit = CACHE.get(key)
        if hit is None and ck is not None and ck_id is None:
            # the file is gone (a server's upload cache removes uploads after an hour), but the
            # model built from it at that path is still here: keep using it
            where = str(ck.resolve())
            hit = CACHE.latest(lambda k: k[0] == spec and k[1] == pretrained and k[2] is not None
                               and k[2][0] == where and k[3:] == key[3:])
        if hit is not None:
            return hit
    t0 = time.perf_counter()
    loaded = _build(spec, pretrained, ck, label_names, hub_timeout, model_kwargs)
    log.info("built %s (%s) in %.2fs", spec, loaded.source, time.perf_counter() - t0)
    if use_cache:
        CACHE.put(key, loaded)
    return loaded


def _build(spec: str, pretrained: bool, ck: Path | None, labels: list[str] | None,
           hub_timeout: float, kwargs: dict) -> LoadedModel:
    import timm

    if not spec:
        raise ModelSourceError("No model given. Choose a bundled model or type a timm name.",
                               code="empty_spec")
    if ck is not None and (spec in BUNDLED or spec.startswith("local-dir:")):
        # these sources carry their own weights; silently ignoring the uploaded file would show
        # the bundled model's maps under the checkpoint's name
        raise ModelSourceError(
            f"A checkpoint file needs the timm architecture it was trained with, but '{spec}' is a "
            "model that brings its own weights. Type the architecture (e.g. vit_small_patch16_224) "
            "in the architecture box.", code="checkpoint_needs_arch", name=spec)
    if spec in BUNDLED:
        folder = assets_dir() / BUNDLED[spec]
        if not (folder / "config.json").is_file():
            raise ModelSourceError(f"The bundled model {spec} is missing from {folder}. Reinstall the "
                                   "package or run 'vit-explorer train-classroom'.", code="bundled_missing")
        m = _finish(_from_local_dir(folder, pretrained, kwargs), spec, "bundled", labels,
                    _read_notes(folder))
        return m
    if spec.startswith("local-dir:"):
        folder = Path(spec.split(":", 1)[1]).expanduser()
        return _finish(_from_local_dir(folder, pretrained, kwargs), spec, "local-dir", labels)
    if spec.startswith(("hf-hub:", "hf_hub:")):
        repo = spec.split(":", 1)[1]
        if not _HF_REPO.fullmatch(repo) or ".." in repo or "--" in repo:
            raise ModelSourceError(f"'{repo}' is not a Hugging Face model repo: write hf-hub:owner/name "
                                   "(letters, digits, '-', '_' and '.', at most 96 characters each).",
                                   code="bad_repo", name=repo[:100])
        if ck is not None:
            raise ModelSourceError("Give either an hf-hub: repo or a checkpoint file with an architecture "
                                   "name, not both.", code="bad_combination")
        if pretrained and not _cached_hub_file(repo) and not hub_reachable(hub_timeout):
            raise HubUnreachableError(_offline_message(f"'{repo}'"), code="hub_unreachable", what=repo)
        try:
            model = timm.create_model(f"hf-hub:{repo}", pretrained=pretrained, **kwargs)
        except Exception as err:
            raise ModelSourceError(f"Could not load hf-hub:{repo}: {type(err).__name__}: {str(err)[:200]}",
                                   code="hub_failed", what=repo) from err
        return _finish(model, spec, "hf-hub", labels)

    check_architecture(spec)
    if ck is not None:
        sd = read_checkpoint(ck)
        num_classes = _infer_num_classes(sd)
        if num_classes is not None:
            kwargs = {**kwargs, "num_classes": num_classes}
        elif not any(k.startswith("head") for k in sd) and "num_classes" not in kwargs:
            # a backbone saved without its classifier (DINOv2-style features): built without one,
            # rather than refused for the head's missing weights
            kwargs = {**kwargs, "num_classes": 0}
        try:  # the architecture's skeleton first, on the meta device: no memory, no time
            with torch.device("meta"):
                skeleton = timm.create_model(spec, pretrained=False, **kwargs)
        except Exception:  # noqa: BLE001 - the real build below says what is wrong
            skeleton = None
        if skeleton is not None:
            # a checkpoint that does not fit is refused before the model is built: a 224-byte file
            # named as vit_large_patch16_224 weights took 7 s and 1.15 GB to refuse (ViT-g: 7 GB)
            _fitted(skeleton, sd, ck.name, spec)
            del skeleton
        try:
            model = timm.create_model(spec, pretrained=False, **kwargs)
        except Exception as err:
            raise ModelSourceError(f"Could not build {spec}: {err}", code="build_failed") from err
        _load_into(model, sd, ck.name, spec)
        labels = labels or read_label_names(ck.parent, ck.stem.split(".")[0])
        return _finish(model, f"{spec} + {ck.name}", "checkpoint", labels)

    if pretrained:
        try:
            cfg = timm.models.get_pretrained_cfg(spec)
        except RuntimeError:  # "Invalid pretrained tag (no_such_tag) for vit_base_patch16_224."
            cfg = None
        repo = getattr(cfg, "hf_hub_id", None) if cfg else None
        if cfg is None or not (repo or getattr(cfg, "url", None) or getattr(cfg, "file", None)):
            raise ModelSourceError(
                f"timm has no pretrained weights for '{spec}'. Use a name with a weights tag "
                f"(e.g. {spec}.augreg_in21k_ft_in1k), pretrained=False for random weights, or a "
                "checkpoint file.", code="no_pretrained", name=spec)
        cached = _cached_hub_file(repo) if repo else None
        if cached:
            model = timm.create_model(spec, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs)
            return _finish(model, spec, "timm", labels)
        if not hub_reachable(hub_timeout):
            raise HubUnreachableError(_offline_message(f"the weights of '{spec}'"), code="hub_unreachable",
                                      what=spec)
    try:
        model = timm.create_model(spec, pretrained=pretrained, **kwargs)
    except Exception as err:
        raise ModelSourceError(f"Could not build {spec}: {type(err).__name__}: {str(err)[:200]}",
                               code="build_failed", name=spec) from err
    families.family_of(model)  # raises for anything timm built that we cannot capture
    return _finish(model, spec, "timm" if pretrained else "random", labels)


#: A Hugging Face repo id: owner/name, each 1-96 of letters, digits, "-", "_" and "." (the hub's own
#: rule, which huggingface_hub enforces with an exception of its own that would reach the user raw).
_HF_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def _from_local_dir(folder: Path, pretrained: bool, kwargs: dict) -> nn.Module:
    import timm

    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"No config.json in {folder}: a local-dir model is a folder with config.json "
                               "and model.safetensors (timm's save_for_hf format).", code="no_config",
                               path=str(folder))
    try:
        arch = json.loads((folder / "config.json").read_text())["architecture"]
    except (ValueError, KeyError) as err:
        raise ModelSourceError(f"{folder / 'config.json'} is not a timm model config ({err}).",
                               code="bad_config") from None
    check_architecture(arch)
    try:
        return timm.create_model(f"local-dir:{folder}", pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        raise CheckpointError(f"The weights in {folder} do not fit its config: {str(err)[:300]}",
                              code="checkpoint_mismatch", name=str(folder), arch=arch, detail=str(err)[:300]) from err


def _read_notes(folder: Path) -> dict:
    p = folder / "training.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except ValueError:
        return {}


def save_local_dir(model: nn.Module, folder: str | os.PathLike, *, model_args: dict,
                   label_names: list[str] | None = None, data_cfg: dict | None = None) -> Path:
    """Save a model in timm's local-dir format (config.json + model.safetensors).

    ``data_cfg`` (mean, std, crop_pct, interpolation, input_size) goes into the saved
    ``pretrained_cfg``, which is what timm and :class:`DataConfig` read back.
    """
    from timm.models import save_for_hf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pcfg = dict(getattr(model, "pretrained_cfg", None) or {})
    for key in ("tag", "hf_hub_id", "url", "file", "license", "paper_ids", "origin_url"):
        pcfg.pop(key, None)
    pcfg.update(data_cfg or {})
    if label_names:
        pcfg["label_names"] = list(label_names)
    model.pretrained_cfg = pcfg
    save_for_hf(model, folder, model_config={"label_names": list(label_names)} if label_names else None,
                model_args=model_args, safe_serialization=True)
    return folder
