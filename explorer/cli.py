"""``vit-explorer``: serve the app (default), or explain / embed / train / evaluate / benchmark.

Each sub-command imports only what its path needs (gradio alone costs seconds).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _serve(a: argparse.Namespace) -> int:
    from .app import launch
    launch(host=a.host, port=a.port, share=a.share, default_model=a.model)
    return 0


def _explain(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import analysis, load_model
    from .capture import explain
    from .errors import ExplorerError
    from .export import artefacts, write_folder
    from .images import decode

    model = load_model(a.model, pretrained=not a.random, checkpoint=a.checkpoint)
    out = Path(a.out)
    opts = analysis.RolloutOptions(head_fusion=a.fusion, discard_ratio=a.discard, start_layer=a.start_layer)
    failures = 0
    for path in tqdm(a.images, unit="img", disable=a.quiet):
        try:
            img = decode(path).array
            exp = explain(model, img)
            q = exp.layout.default_query() if a.query is None else a.query
            files = artefacts(exp, img, opts, q, model.name)
            write_folder(files, out / Path(path).stem)
        except ExplorerError as err:
            print(f"{path}: {err}", file=sys.stderr)
            failures += 1
    return 1 if failures == len(a.images) else 0


def _embed(a: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from . import imagesets, load_model
    from .analysis import embeddings as E
    from .render import figures

    model = load_model(a.model, pretrained=not a.random, checkpoint=a.checkpoint)
    found = imagesets.from_folder(a.folder, E.MAX_IMAGES)
    E.check_count(len(found.items))
    bar = tqdm(total=len(found.items), unit="img", disable=a.quiet)
    emb = E.embed_images(model, found.items, progress=lambda d, n: bar.update(d - bar.n))
    bar.close()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    xy = E.tsne_2d(emb.final)
    sil = E.silhouette(emb.final, found.labels)
    np.savez_compressed(out / "embeddings.npz", class_tokens=emb.class_tokens, final=emb.final, tsne=xy,
                        labels=np.array(found.labels), names=np.array(found.names))
    fig = figures.tsne_plot([{"title": f"{model.name} (silhouette {sil if sil is None else round(sil, 3)})",
                              "xy": xy, "groups": found.labels, "hover": found.names,
                              "thumbs": [""] * len(found.names)}], title="t-SNE of class tokens")
    fig.write_html(out / "tsne.html", include_plotlyjs=True)
    print(json.dumps({"images": len(found.items), "silhouette": sil, "out": str(out)}))
    return 0


def _train(a: argparse.Namespace) -> int:
    from .classroom.train import TrainConfig, train
    from .zoo import assets_dir

    for kind in a.model:
        cfg = TrainConfig(model=kind, images=a.images, minutes=a.minutes, seed=a.seed, threads=a.threads,
                          resume=a.resume, init=a.init, max_minutes=a.minutes,
                          **({"lr": a.lr} if a.lr else {}))
        out = (Path(a.out) if a.out else assets_dir()) / f"classroom-{kind}"
        train(cfg, out=out, progress=not a.quiet)
    return 0


def _evaluate(a: argparse.Namespace) -> int:
    from .classroom.evaluate import evaluate, format_report

    report = evaluate(images=a.images, seed=a.seed, models=a.model)
    print(format_report(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0 if report["passed"] or not a.strict else 1


def _examples(a: argparse.Namespace) -> int:
    from .classroom.examples import write_examples
    write_examples(Path(a.out) if a.out else None)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["bench"]:  # the benchmark has its own options (argparse.REMAINDER drops leading ones)
        from .bench import main as bench_main
        return bench_main(args[1:])
    p = argparse.ArgumentParser(prog="vit-explorer", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd")

    s = sub.add_parser("serve", help="launch the app (default)")
    s.add_argument("--host", default=None, help="default 127.0.0.1 (GRADIO_SERVER_NAME)")
    s.add_argument("--port", type=int, default=None, help="default 7860 (GRADIO_SERVER_PORT)")
    s.add_argument("--share", action="store_true", help="also open a public share link")
    s.add_argument("--model", default="classroom-vit", help="model selected at start")
    s.set_defaults(fn=_serve)

    for name, fn, helptext in (("explain", _explain, "rollout, patch grid, per-layer maps, arrays, summary per image"),
                               ("embed", _embed, "class-token embeddings + t-SNE of a folder (labels = sub-folders)")):
        e = sub.add_parser(name, help=helptext)
        if name == "explain":
            e.add_argument("images", nargs="+")
            e.add_argument("--fusion", default="mean", choices=["mean", "max", "min"])
            e.add_argument("--discard", type=float, default=0.0)
            e.add_argument("--start-layer", type=int, default=0)
            e.add_argument("--query", type=int, default=None, help="token index (default: class token)")
        else:
            e.add_argument("folder")
        e.add_argument("--model", default="classroom-vit")
        e.add_argument("--checkpoint", default=None, help="weights for --model's architecture")
        e.add_argument("--random", action="store_true", help="random weights (no download)")
        e.add_argument("--out", default="out")
        e.add_argument("-q", "--quiet", action="store_true")
        e.set_defaults(fn=fn)

    t = sub.add_parser("train-classroom", help="train the bundled shapes models from scratch")
    t.add_argument("--model", nargs="+", default=["vit", "tnt"], choices=["vit", "tnt"])
    t.add_argument("--images", type=int, default=0, help="training images (0: as many as --minutes allow)")
    t.add_argument("--minutes", type=float, default=45.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--out", default=None, help="parent folder of classroom-<model>/ (default assets/)")
    t.add_argument("--resume", default=None, help="continue a saved model at full clutter (a second phase)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3)")
    t.add_argument("--init", default="mimetic", choices=["mimetic", "timm"],
                   help="attention initialisation (default: mimetic, Trockman & Kolter 2023)")
    t.add_argument("-q", "--quiet", action="store_true")
    t.set_defaults(fn=_train)

    ev = sub.add_parser("eval-classroom", help="accuracy, rollout-on-object, sanity check, pos-emb, silhouette")
    ev.add_argument("--images", type=int, default=400)
    ev.add_argument("--seed", type=int, default=None, help="default: the evaluation seed (disjoint from training)")
    ev.add_argument("--model", nargs="+", default=["classroom-vit", "classroom-tnt"])
    ev.add_argument("--json", default=None)
    ev.add_argument("--strict", action="store_true", help="exit 1 when a threshold is missed")
    ev.set_defaults(fn=_evaluate)

    ex = sub.add_parser("make-examples", help="write the shapes examples (images + masks) to assets/examples")
    ex.add_argument("--out", default=None)
    ex.set_defaults(fn=_examples)

    sub.add_parser("bench", help="benchmark against a plain forward pass (vit-explorer bench --help)")

    a = p.parse_args(args)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if a.cmd is None:
        a = p.parse_args(["serve"] + args)
    from .errors import ExplorerError
    try:
        return a.fn(a)
    except ExplorerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
