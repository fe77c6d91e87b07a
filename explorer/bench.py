"""``vit-explorer bench`` / ``python -m explorer.bench``: how fast the explorer is, against what a user
would otherwise write, in one run on the same inputs.

Cases (``--cases``; all by default):

* ``explain``: capture + Explanation vs a plain fused forward pass (1 image; a batch of 32), the
  public ``explain()`` from a PNG file, and the class-token rollout map against hand-written hooks
  on ``attn_drop`` (fused attention off, full matrix chain) and ``timm.utils.AttentionExtract``.
* ``views``: every view of one image from its Explanation, overlays at 12 MP, vs one forward pass.
* ``slider``: slider / click / query events answered from the session, as the app's handlers do;
  forward passes counted.
* ``rollout``: one query token's rollout vs the full matrix chain at 1370 tokens.
* ``memory``: the attention kept for a 1370-token model, float16 vs float32 results, peak RSS.
* ``embed``: class-token embedding throughput vs a plain batched forward; PCA + t-SNE time.
* ``imports`` and ``coldstart``: import costs; server start to first page and to first explanation.

Models: ViT-B/16 at 224, DINOv2-S/14 at 518 (1370 tokens) and TNT-S/16 at 224, random weights (speed
does not depend on them). ``--quick`` uses 2-block models at 64–126 px, few repeats, 50 images and
skips the cold-start cases unless ``--cold-start``. Prints a table of medians [min–max], ratios
(median of per-round ratios between interleaved variants) and PASS/FAIL per target; exits
non-zero only with ``--strict`` when a target is missed.
The full run takes ~25 minutes on 2 CPU cores: a third of it embeds 1,000 images with ViT-B
(``--images`` shortens that), 4 minutes explain DINOv2's batch of 32 (14 GB at its peak; skipped,
saying why, when the memory is not there).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from .bench_core import Row, Timer, format_table, summary, write_json

ALL_CASES = ["explain", "views", "slider", "rollout", "memory", "embed", "imports", "coldstart"]
COLD_CASES = ("imports", "coldstart")


def _models(quick: bool) -> dict:
    from .bench_cases import ModelSpec

    if quick:
        return {"vit": ModelSpec("vit", "vit_tiny_patch16_224", {"img_size": 64, "depth": 2}, "ViT-Ti/16 @64, 2 blocks"),
                "hightok": ModelSpec("hightok", "vit_small_patch14_dinov2", {"img_size": 126, "depth": 2},
                                     "DINOv2-S/14 @126, 2 blocks"),
                "tnt": ModelSpec("tnt", "tnt_s_patch16_224", {"img_size": 64, "depth": 2}, "TNT-S/16 @64, 2 blocks")}
    return {"vit": ModelSpec("vit", "vit_base_patch16_224", {}, "ViT-B/16 @224"),
            "hightok": ModelSpec("hightok", "vit_small_patch14_dinov2", {"img_size": 518}, "DINOv2-S/14 @518"),
            "tnt": ModelSpec("tnt", "tnt_s_patch16_224", {}, "TNT-S/16 @224")}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vit-explorer bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, few repeats (seconds, for tests)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per variant (default 7, quick 3; three times that for the explain case on "
                        "models under 1000 tokens)")
    p.add_argument("--cases", default=None, help=f"comma-separated subset of {','.join(ALL_CASES)}")
    p.add_argument("--models", default=None, help="comma-separated subset of vit,hightok,tnt")
    p.add_argument("--images", type=int, default=None, help="images to embed (default 1000, quick 50)")
    p.add_argument("--batch", type=int, default=32, help="batch size of the batched explain target")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cold-start", action="store_true", help="with --quick: also run imports and coldstart")
    p.add_argument("--json", default=None, help="write every row, with all timings, to this file")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed or a row fails")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:  # `vit-explorer bench -- --quick`: the CLI's REMAINDER keeps the separator
        args = args[1:]
    a = parse_args(args)
    import torch

    from . import bench_cases, bench_cold, bench_views

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    cases = [c.strip() for c in (a.cases or ",".join(ALL_CASES)).split(",") if c.strip()]
    unknown = [c for c in cases if c not in ALL_CASES]
    if unknown:
        print(f"error: unknown case(s) {', '.join(unknown)}; choose from {', '.join(ALL_CASES)}", file=sys.stderr)
        return 2
    specs = _models(a.quick)
    if a.models:
        keep = [k.strip() for k in a.models.split(",")]
        if any(k not in specs for k in keep):
            print(f"error: --models takes a subset of {', '.join(specs)}", file=sys.stderr)
            return 2
        specs = {k: v for k, v in specs.items() if k in keep}
    repeats = a.repeats or (3 if a.quick else 7)
    tmp = tempfile.TemporaryDirectory(prefix="vit-bench-")
    cfg = bench_cases.BenchConfig(
        quick=a.quick, device=device, repeats=repeats, heavy_repeats=max(1, min(repeats, 2 if a.quick else 3)),
        warmup=1, batch=a.batch, embed_images=a.images or (50 if a.quick else 1000), embed_batch=32,
        photo_size=(800, 600) if a.quick else (4000, 3000), models=specs, workdir=Path(tmp.name))
    timer = Timer(cuda=device.type == "cuda")
    models = bench_cases.Models(cfg)
    runners = {**bench_cases.CASES, **bench_views.CASES, **bench_cold.CASES}
    runners = {c: runners[c] for c in ALL_CASES}
    rows: list[Row] = []
    case_info: dict[str, dict] = {}
    load0 = _loadavg()
    t_start = time.perf_counter()
    try:
        for case in cases:
            if case in COLD_CASES and a.quick and not (a.cold_start or a.cases):
                rows += bench_cold.skipped_rows(case, "skipped in --quick (add --cold-start)")
                case_info[case] = {"skipped": True}
                continue
            timer.case_start()
            t0 = time.perf_counter()
            try:
                got = runners[case](cfg, models, timer)
            except Exception as err:  # one broken case must not hide the others
                got = [Row(f"{case}.error", case, f"case {case} failed", status="ERROR",
                           note=f"{type(err).__name__}: {str(err)[:300]}")]
                cfg.log(f"{case} failed: {type(err).__name__}: {err}")
            peak = timer.case_end()
            case_info[case] = {"seconds": time.perf_counter() - t0, **peak}
            rows += got
    finally:
        tmp.cleanup()
        import gc
        gc.unfreeze()
    meta = _meta(a, cfg, timer, models, load0, time.perf_counter() - t_start)
    if a.json:
        write_json(a.json, meta, rows, case_info)
    print(_header(meta, case_info))
    print(format_table(rows))
    s = summary(rows)
    print(f"\ntargets: {s['targets']} — " + ", ".join(f"{k} {v}" for k, v in s.items()
                                                       if k not in ("targets", "failed")))
    if s["failed"]:
        print("missed: " + ", ".join(s["failed"]))
    errors = [r for r in rows if r.status == "ERROR"]
    return 1 if a.strict and (s["failed"] or errors) else 0


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _meta(a: argparse.Namespace, cfg, timer: Timer, models, load0, seconds: float) -> dict:
    import torch

    loaded = {}
    for key, spec in cfg.models.items():
        m = models._loaded.get(key)
        loaded[key] = {"name": spec.name, "kwargs": spec.kwargs, "label": spec.label,
                       **({"tokens": m.facts.tokens, "params": m.facts.params, "layers": m.facts.layers,
                           "heads": m.facts.heads} if m is not None else {})}
    return {"quick": a.quick, "device": str(cfg.device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "repeats": cfg.repeats, "heavy_repeats": cfg.heavy_repeats,
            "batch": cfg.batch, "embed_images": cfg.embed_images, "photo_size": list(cfg.photo_size),
            "memory_method": timer.probe.method, "memory_note": timer.probe.describe(),
            "timing": "perf_counter, warm-up first, variants interleaved in rotating order, ratios: "
                      "median of per-round ratios (else ratio of medians)",
            "loadavg_start": load0, "loadavg_end": _loadavg(), "seconds": round(seconds, 1), "models": loaded,
            "argv": sys.argv[1:]}


def _header(meta: dict, case_info: dict) -> str:
    lines = [f"ViT Attention Explorer benchmark{' (quick)' if meta['quick'] else ''}: {meta['device']}, "
             f"torch {meta['torch']}, {meta['threads']} threads on {meta['cpus']} CPUs, repeats {meta['repeats']} "
             f"(heavy {meta['heavy_repeats']}; explain ×3 under 1000 tokens), "
             f"load average {meta['loadavg_start']} → {meta['loadavg_end']}, "
             f"{meta['seconds']:.0f} s"]
    for key, m in meta["models"].items():
        extra = f", {m['tokens']} tokens, {m['params'] / 1e6:.1f}M params" if "tokens" in m else ""
        lines.append(f"  {key:8s} {m['name']} {m['kwargs'] or ''} ({m['label']}{extra}), random weights")
    lines.append(f"  memory: {meta['memory_note']}")
    lines.append("  times: median [min–max] over repeats; value: a ratio (ours / reference unless the row says "
                 "otherwise: the median of per-round ratios where both sides ran in the same interleaved rounds, "
                 "else of medians), ms, s, MB or a count")
    for case, info in case_info.items():
        if info.get("skipped"):
            lines.append(f"  case {case}: skipped")
        else:
            lines.append(f"  case {case}: {info['seconds']:.1f} s, peak RSS {info['peak_mb']:.0f} MB "
                         f"(+{info['delta_mb']:.0f} MB over its start)"
                         + (f", GPU peak +{info['gpu_peak_mb']:.0f} MB" if "gpu_peak_mb" in info else ""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
