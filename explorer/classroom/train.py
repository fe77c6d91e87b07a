"""Train the bundled classroom models from scratch on the shapes task, on CPU.

ViTs have no convolutional inductive bias, so from scratch they learn slowly; what made these
train in minutes on 2 cores (see each model's ``training.json`` for the record):

* a curriculum: scenes start clean and reach full clutter at ``curriculum`` of the run;
* a DeiT-style schedule: AdamW, linear warm-up, cosine decay, weight decay 0.05, label smoothing;
* fresh images every step (the generator is infinite), so there is nothing to over-fit.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import shapes

log = logging.getLogger(__name__)

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
#: How the bundled models want their input (scenes are 64×64: no crop, no resampling).
DATA_CFG = {"mean": MEAN, "std": STD, "crop_pct": 1.0, "interpolation": "bilinear", "input_size": (3, 64, 64),
            "crop_mode": "center"}
TRAIN_SEED = 0  # image stream used for training
VAL_SEED = 1  # held-out images for the learning curve
EVAL_SEED = 1000  # fresh images for `eval-classroom` (disjoint from both)

ARCHITECTURES = {
    # A standard timm VisionTransformer: learned 1D position embeddings, class token.
    "vit": dict(architecture="vit_tiny_patch16_224", model_args=dict(
        img_size=64, patch_size=8, embed_dim=96, depth=6, num_heads=4, mlp_ratio=2.0,
        num_classes=len(shapes.CLASSES), class_token=True, global_pool="token")),
    # A standard timm TNT: 8×8 patches split into 4×4 inner tokens of 2×2 pixels.
    "tnt": dict(architecture="tnt_s_patch16_224", model_args=dict(
        img_size=64, patch_size=8, embed_dim=64, inner_dim=16, depth=6, num_heads_outer=4,
        num_heads_inner=2, mlp_ratio=2.0, first_stride=2, num_classes=len(shapes.CLASSES))),
}


@dataclass
class TrainConfig:
    """Settings of one training run (recorded next to the weights)."""

    model: str = "vit"  # "vit" or "tnt"
    images: int = 0  # training images seen (fresh every step); 0: as many as ``minutes`` allow,
    #                  measured over the first steps and recorded, so a rerun can pass the number
    minutes: float = 45.0  # time budget used to size ``images`` when it is 0
    batch_size: int = 48
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.05
    warmup_images: int = 5_000
    label_smoothing: float = 0.1
    curriculum: float = 0.45  # fraction of the run over which scenes go from easy to full clutter
    easy_start: float = 0.9  # share of easy scenes (plain field, strong contrast) at the start
    grad_clip: float = 1.0
    seed: int = 0  # weight initialisation
    threads: int = 2
    max_minutes: float = 45.0  # hard stop (saving what there is) if the machine is slower than measured
    eval_every: int = 10_000  # images between learning-curve points
    val_images: int = 512
    resume: str | None = None  # continue from a saved model (local-dir), at full clutter
    init: str = "mimetic"  # "mimetic" (Trockman & Kolter 2023) or "timm" (the library's default)


@dataclass
class Curve:
    images: list[int] = field(default_factory=list)
    minutes: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    clutter: list[float] = field(default_factory=list)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def build(kind: str, seed: int = 0):
    import timm
    torch.manual_seed(seed)
    spec = ARCHITECTURES[kind]
    return timm.create_model(spec["architecture"], pretrained=False, **spec["model_args"])


@torch.no_grad()
def mimetic_init(model, qk: tuple[float, float] = (0.7, 0.7), vo: tuple[float, float] = (0.4, 0.4),
                 seed: int = 0) -> int:
    """Mimetic initialisation of self-attention (Trockman & Kolter 2023, "Mimetic Initialization
    of Self-Attention Layers"): start every head with ``W_q^T W_k ≈ a·Z + b·I`` (queries attend to
    similar keys, so attention begins local through the position embeddings) and
    ``W_v^T W_o^T ≈ a·Z - b·I``, ``Z`` random with variance 1/d. Only the initial values change:
    the model stays a standard timm one. Returns how many attention layers were set.
    """
    g = torch.Generator().manual_seed(seed)
    done = 0
    for mod in model.modules():
        heads, proj = getattr(mod, "num_heads", None), getattr(mod, "proj", None)
        if not heads or not isinstance(proj, torch.nn.Linear):
            continue
        if isinstance(getattr(mod, "qkv", None), torch.nn.Linear):  # ViT: rows q | k | v
            w = mod.qkv.weight
            d = w.shape[1]
            hidden = d
            q, k, v = w[:d], w[d:2 * d], w[2 * d:]
        elif isinstance(getattr(mod, "qk", None), torch.nn.Linear) and isinstance(getattr(mod, "v", None),
                                                                                  torch.nn.Linear):
            w = mod.qk.weight  # TNT: rows q | k (width hidden), and a separate v
            d, hidden = w.shape[1], w.shape[0] // 2
            q, k, v = w[:hidden], w[hidden:], mod.v.weight
        else:
            continue
        hd = hidden // heads
        eye = torch.eye(d)
        for h in range(heads):
            z = torch.randn(d, d, generator=g) / d ** 0.5
            u, s, vt = torch.linalg.svd(qk[0] * z + qk[1] * eye)
            r = min(hd, d)
            root = s[:r].sqrt()
            q[h * hd:h * hd + r] = (u[:, :r] * root).T  # W_q^T W_k = U_r S_r V_r^T
            k[h * hd:h * hd + r] = (vt[:r].T * root).T
        z = torch.randn(d, d, generator=g) / d ** 0.5
        u, s, vt = torch.linalg.svd(vo[0] * z - vo[1] * eye)
        root = s.sqrt()
        v.copy_((u * root).T)  # W_v^T W_o^T = U S V^T
        proj.weight.copy_(vt.T * root)
        done += 1
    return done


@torch.no_grad()
def accuracy(model, images: np.ndarray, labels: np.ndarray, batch: int = 256) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(images), batch):
        hits += (model(to_tensor(images[i:i + batch])).argmax(-1).numpy() == labels[i:i + batch]).sum()
    return float(hits) / len(images)


def lr_at(cfg: TrainConfig, seen: int) -> float:
    if seen < cfg.warmup_images or not cfg.images:
        return cfg.lr * min(1.0, seen / cfg.warmup_images)
    t = (seen - cfg.warmup_images) / max(1, cfg.images - cfg.warmup_images)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train(cfg: TrainConfig, out: Path | None = None, progress: bool = True):
    """Train one classroom model; save it to ``out`` (timm local-dir format) if given."""
    from tqdm import tqdm

    torch.set_num_threads(cfg.threads)
    model = build(cfg.model, cfg.seed)
    if cfg.init == "mimetic" and not cfg.resume:
        log.info("mimetic initialisation of %d attention layers", mimetic_init(model, seed=cfg.seed))
    previous = None
    if cfg.resume:  # a second phase: same architecture, weights from the first, scenes at full clutter
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(Path(cfg.resume) / "model.safetensors")))
        previous = json.loads((Path(cfg.resume) / "training.json").read_text())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos" not in n and "token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos" not in n and "token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
    val_x, _, val_y = shapes.batch(VAL_SEED, 0, cfg.val_images)
    curve = Curve()
    seen, step, t0 = 0, 0, time.perf_counter()
    losses: list[float] = []
    bar = tqdm(total=cfg.images or None, unit="img", unit_scale=True, disable=not progress, desc=f"train {cfg.model}")
    total = cfg.images or 10**9
    while seen < total:
        if not cfg.images and step == 30:  # size the run from the measured speed
            rate = seen / (time.perf_counter() - t0)
            total = cfg.images = int(rate * cfg.minutes * 60 * 0.97) // cfg.batch_size * cfg.batch_size
            bar.reset(total=total)
            bar.update(seen)
            log.info("%.0f images/s: the %.0f-minute budget allows %d images", rate, cfg.minutes, total)
        clutter = 1.0 if cfg.resume else min(1.0, seen / max(1, cfg.curriculum * total))
        scene = shapes.SceneConfig(clutter=clutter, easy=cfg.easy_start * (1.0 - clutter))
        x, _, y = shapes.batch(TRAIN_SEED + 7919 * cfg.seed, seen, cfg.batch_size, scene)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, seen)
        model.train()
        loss = F.cross_entropy(model(to_tensor(x)), torch.from_numpy(y), label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        seen += cfg.batch_size
        step += 1
        bar.update(cfg.batch_size)
        minutes = (time.perf_counter() - t0) / 60
        if seen % cfg.eval_every < cfg.batch_size or seen >= total or minutes > cfg.max_minutes:
            acc = accuracy(model, val_x, val_y)
            curve.images.append(seen)
            curve.minutes.append(round(minutes, 2))
            curve.train_loss.append(round(float(np.mean(losses[-50:])), 4))
            curve.val_acc.append(round(acc, 4))
            curve.clutter.append(round(clutter, 3))
            bar.set_postfix(loss=curve.train_loss[-1], val_acc=acc, clutter=round(clutter, 2))
            log.info("%s: %d images, %.1f min, loss %.3f, val acc %.3f", cfg.model, seen, minutes,
                     curve.train_loss[-1], acc)
            if out is not None:
                save(model, cfg, curve, out, minutes, previous)
        if minutes > cfg.max_minutes:
            log.warning("time budget of %.0f min reached after %d images", cfg.max_minutes, seen)
            break
    bar.close()
    model.eval()
    if out is not None:
        save(model, cfg, curve, out, (time.perf_counter() - t0) / 60, previous)
    return model, curve


def save(model, cfg: TrainConfig, curve: Curve, out: Path, minutes: float, previous: dict | None = None) -> None:
    from ..zoo import save_local_dir

    spec = ARCHITECTURES[cfg.model]
    tmp = Path(str(out) + ".partial")
    save_local_dir(model, tmp, model_args=spec["model_args"], label_names=list(shapes.CLASSES),
                   data_cfg=DATA_CFG)
    record = {
        "what": f"classroom {cfg.model.upper()} trained from scratch on the synthetic shapes task",
        "architecture": spec["architecture"], "model_args": spec["model_args"],
        "classes": list(shapes.CLASSES), "classes_zh": list(shapes.CLASSES_ZH),
        "settings": asdict(cfg), "train_seed": TRAIN_SEED, "val_seed": VAL_SEED,
        "minutes": round(minutes, 1), "torch": torch.__version__,
        "images_seen": curve.images[-1] if curve.images else 0,
        "stopped_by_time_limit": bool(curve.images) and curve.images[-1] < cfg.images,
        "threads": torch.get_num_threads(), "curve": asdict(curve),
        "command": f"vit-explorer train-classroom --model {cfg.model} --images {cfg.images} --seed {cfg.seed} "
                   f"--threads {cfg.threads} --init {cfg.init}"
                   + (" --resume <first phase>" if cfg.resume else ""),
    }
    if previous is not None:  # one record, one continuous curve over both phases
        first = previous.get("phases", [previous])
        done = previous["curve"]["images"][-1]
        record["phases"] = first + [{k: v for k, v in record.items() if k not in ("phases",)}]
        record["minutes"] = round(previous["minutes"] + minutes, 1)
        record["curve"] = {k: previous["curve"][k] + [
            (v + done if k == "images" else round(v + previous["minutes"], 2) if k == "minutes" else v)
            for v in getattr(curve, k)] for k in previous["curve"]}
    (tmp / "training.json").write_text(json.dumps(record, indent=1))
    out = Path(out)
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
