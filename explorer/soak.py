"""Soak, overload and memory test of the real app: ``python -m explorer.soak [--short]``.

Starts ``python -m explorer serve`` on 127.0.0.1 (never another address), drives it with
``gradio_client`` and prints one table of figures, each with PASS or FAIL; exits 1 when any falls
short. Nothing here touches the network: the hub is switched off (``HF_HUB_OFFLINE=1``).

1. Load: ``--clients`` users at once for ``--minutes`` on the bundled models; a share
   ``--malformed`` of their requests is broken on purpose (empty, fake, truncated, bomb, tiny,
   sliver and SVG images, unknown and non-ViT model names, a query outside the grid, a t-SNE set of
   two). Every malformed request must get its own message (English or Chinese, picked at random),
   every valid one the result computed independently in this process; any other answer counts as
   a server error, and so does a traceback in the server's log. Resident memory (VmRSS of the
   server process) at request ``--requests`` must be within 5 % of request ``--requests``/10,
   both counted after a warm-up in which every client ran every kind of request once.
2. Overload: 3 × the queue size joins at the same moment: the excess must be refused as busy
   (HTTP 503) within a second, and every accepted request must complete with the right answer.
3. Memory: a second server (the same one in a short run) with ``VIT_EXPLORER_RANDOM_WEIGHTS=1`` (curated timm names build with
   random weights: they cannot be downloaded here) and a model cache of one: the baseline is the
   bundled model loaded and run; then every curated architecture (small variants where the
   curated one is large) is loaded three times over, the bundled one again, and memory must stay
   within 10 % of the baseline.

``--short`` runs each figure for a few seconds (used by the test suite).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from .soak_users import (CONTROLS, LOAD_STATUS, PRED, ROOT, Tally, User, expected_answers, make_inputs,
                         same_answer, top5)

#: the curated picker, each as the smallest architecture of its kind (random weights, offline)
CURATED_SMALL = {
    "vit_base_patch16_224.augreg2_in21k_ft_in1k": "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
    "vit_small_patch16_224.augreg_in21k_ft_in1k": "vit_small_patch16_224.augreg_in21k_ft_in1k",
    "deit_small_patch16_224.fb_in1k": "deit_tiny_patch16_224.fb_in1k",
    "deit_small_distilled_patch16_224.fb_in1k": "deit_tiny_distilled_patch16_224.fb_in1k",
    "vit_small_patch14_dinov2.lvd142m": "vit_small_patch14_dinov2.lvd142m",
    "vit_small_patch14_reg4_dinov2.lvd142m": "vit_small_patch14_reg4_dinov2.lvd142m",
    "tnt_s_patch16_224": "tnt_s_patch16_224",
}


# ----------------------------------------------------------------------------- the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m explorer serve`` on a free loopback port, its log in a temporary file."""

    def __init__(self, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = Path(tempfile.mkstemp(prefix="vit-soak-", suffix=".log")[1])
        full = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                "GRADIO_SERVER_NAME": "127.0.0.1", **(env or {})}
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "explorer", "serve", "--host", "127.0.0.1",
                                          "--port", str(self.port)], cwd=ROOT, env=full, stdout=fh,
                                         stderr=subprocess.STDOUT)

    def ready(self, timeout: float = 180.0) -> "Server":
        """Wait until the server answers (it starts in the background: several can start at once)."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("server did not start")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def tracebacks(self) -> int:
        return self.log.read_text(errors="replace").count("Traceback (most recent call last)")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.unlink(missing_ok=True)


def run_load(server: Server, args, inputs: dict, expected: dict) -> tuple[Tally, float]:
    users = [User(server.url, inputs, expected, args.malformed, seed=i) for i in range(args.clients)]
    with cf.ThreadPoolExecutor(args.clients) as ex:
        list(ex.map(lambda iu: iu[1].warm_up(full=not args.short or iu[0] == 0), enumerate(users)))
    tally = Tally()
    marks = (max(1, args.requests // 10), args.requests)
    tb_before = server.tracebacks()
    deadline = time.time() + 60 * args.minutes
    hard_stop = deadline + 60 * max(args.minutes, 0.5) * 2  # give slow machines time to reach --requests

    def loop(u: User) -> None:
        while time.time() < deadline or (tally.done < args.requests and time.time() < hard_stop):
            t0 = time.perf_counter()
            try:
                kind, ok, detail = u.step()
            except Exception as e:  # a valid request that failed, a busy answer, a broken connection
                kind, ok, detail = "error", False, f"{type(e).__name__}: {str(e)[:160]}"
            tally.add(kind, ok, time.perf_counter() - t0, detail, server, marks)

    t0 = time.time()
    with cf.ThreadPoolExecutor(args.clients) as ex:
        list(ex.map(loop, users))
    tally.counts[("traceback", False)] = server.tracebacks() - tb_before
    return tally, time.time() - t0


# ----------------------------------------------------------------------------- overload

def _join(url: str, fn: int, data: list, session: str) -> int:
    body = json.dumps({"data": data, "fn_index": fn, "session_hash": session, "event_data": None,
                       "trigger_id": None}).encode()
    req = urllib.request.Request(url + "gradio_api/queue/join", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _wait(url: str, session: str) -> dict:
    last: dict = {}
    with urllib.request.urlopen(url + f"gradio_api/queue/data?session_hash={session}", timeout=300) as r:
        for line in r:
            if line.startswith(b"data:"):
                last = json.loads(line[5:])
                if last.get("msg") in ("process_completed", "close_stream"):
                    break
    return last


def run_overload(server: Server, queue: int, image: Path, expected: dict) -> dict:
    """3 × queue joins at once (raw HTTP, the image uploaded beforehand, so that what is timed is
    the server's decision and not the uploads)."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{image.name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(server.url + "gradio_api/upload", body,
                                 {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        path = json.load(r)[0]
    cfg = json.load(urllib.request.urlopen(server.url + "config", timeout=10))
    dep = next(d for d in cfg["dependencies"] if d.get("api_name") == "explain")
    types = {comp["id"]: comp["type"] for comp in cfg["components"]}
    defaults = {comp["id"]: comp.get("props", {}).get("value") for comp in cfg["components"]}
    values = iter([{"path": path, "orig_name": image.name, "meta": {"_type": "gradio.FileData"}}, "en", *CONTROLS, 8, 8])
    # inputs after the ones given take the component's default value, as gradio_client does
    data = [None if types[i] == "state" else next(values, defaults.get(i)) for i in dep["inputs"]]
    want = expected[("classroom-vit", image.name)]
    n = 3 * queue
    barrier = threading.Barrier(n)

    def one(_):
        session = uuid.uuid4().hex[:12]
        barrier.wait()
        t0 = time.perf_counter()
        status = _join(server.url, dep["id"], data, session)
        answered = time.perf_counter() - t0
        if status != 200:
            return status, answered, None
        ev = _wait(server.url, session)
        preds = [d for d in (ev.get("output") or {}).get("data", []) if isinstance(d, dict) and "confidences" in d]
        return status, answered, bool(ev.get("success") and preds and same_answer(top5(preds[0]), want))

    with cf.ThreadPoolExecutor(n) as ex:
        results = list(ex.map(one, range(n)))
    busy = [r for r in results if r[0] == 503]
    accepted = [r for r in results if r[0] == 200]
    return {"sent": n, "busy": len(busy), "busy_max_s": max((r[1] for r in busy), default=float("nan")),
            "accepted": len(accepted), "completed_ok": sum(1 for r in accepted if r[2]),
            "other": len(results) - len(busy) - len(accepted)}


# ----------------------------------------------------------------------------- memory

MEMORY_ENV = {"VIT_EXPLORER_RANDOM_WEIGHTS": "1", "VIT_EXPLORER_MODEL_CACHE": "1"}


def run_memory(server: Server, cycles: int, image: Path, expected: dict, with_images: bool) -> dict:
    """Baseline: the bundled model loaded and run. Then every curated architecture, ``cycles``
    times, then the bundled model again; RSS compared with the baseline."""
    from gradio_client import Client, handle_file

    server.ready()
    c = Client(server.url, verbose=False)
    img = handle_file(str(image))

    def bundled() -> bool:
        out = c.predict("classroom-vit", None, "", img, "en", *CONTROLS, 8, 8, api_name="/load_model")
        pred = c.predict(img, "en", *CONTROLS, 8, 8, api_name="/explain")[PRED]
        return "Loaded **classroom-vit**" in out[LOAD_STATUS] and same_answer(top5(pred),
                                                                       expected[("classroom-vit", image.name)])

    ok = all(bundled() for _ in range(2))  # warm-up
    base = server.rss_mb()
    loads = 0
    for _ in range(cycles):
        for name in CURATED_SMALL.values():
            out = c.predict(name, None, "", img if with_images else None, "en", *CONTROLS, 8, 8,
                            api_name="/load_model")
            ok &= f"Loaded **{name}**" in out[LOAD_STATUS]
            loads += 1
        peak = server.rss_mb()
    ok &= bundled()
    end = server.rss_mb()
    return {"baseline": base, "after": end, "peak": peak, "loads": loads, "ok": ok}


# ----------------------------------------------------------------------------- report

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m explorer.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="length of the load phase")
    ap.add_argument("--clients", type=int, default=8, help="simulated users at once")
    ap.add_argument("--malformed", type=float, default=0.2, help="share of broken requests")
    ap.add_argument("--requests", type=int, default=1000,
                    help="memory is compared at this request and at a tenth of it")
    ap.add_argument("--queue", type=int, default=24, help="the server's queue size (VIT_EXPLORER_QUEUE)")
    ap.add_argument("--cycles", type=int, default=3, help="passes through the curated models")
    ap.add_argument("--short", action="store_true", help="a few seconds per figure (for the test suite)")
    ap.add_argument("--memory-only", action="store_true", help="run the model-cycling memory figure alone")
    args = ap.parse_args(argv)
    if args.short:
        args.minutes, args.clients, args.requests, args.queue, args.cycles = 0.1, 3, 30, 4, 1

    rows: list[tuple[str, str, str, bool | None]] = []
    with tempfile.TemporaryDirectory(prefix="vit-soak-") as tmp:
        inputs = make_inputs(Path(tmp))
        t0 = time.time()
        # both servers start in the background while the expected answers are computed here
        # the servers start in the background while the expected answers are computed here; a short
        # run uses one server for every phase (the memory phase comes last and has its own baseline)
        queue_env = {"VIT_EXPLORER_QUEUE": str(args.queue)}
        server = None if args.memory_only else Server({**queue_env, **MEMORY_ENV} if args.short else queue_env)
        mem_server = server if args.short else Server(MEMORY_ENV)
        try:
            expected = expected_answers(inputs["valid"], ["classroom-vit", "classroom-tnt"])
            if server is not None:
                try:
                    tally, seconds = run_load(server.ready(), args, inputs, expected)
                    t_load = time.time()
                    over = run_overload(server, args.queue, inputs["valid"][0], expected)
                    t_over = time.time()
                finally:
                    if server is not mem_server:
                        server.stop()
            mem = run_memory(mem_server, args.cycles, inputs["valid"][0], expected, with_images=not args.short)
        finally:
            mem_server.stop()
        if args.memory_only:
            print(mem)
            return 0 if mem["ok"] and mem["after"] <= 1.10 * mem["baseline"] else 1

    c = tally.counts
    valid_ok = sum(n for (k, ok), n in c.items() if ok and k not in ("malformed", "traceback"))
    valid_all = sum(n for (k, ok), n in c.items() if k not in ("malformed", "traceback", "error")) + c[("error", False)]
    bad_ok, bad_all = c[("malformed", True)], c[("malformed", True)] + c[("malformed", False)]
    errors = c[("error", False)] + c[("traceback", False)]
    lat = sorted(tally.latencies) or [float("nan")]
    early, late = max(1, args.requests // 10), args.requests
    r_early, r_late = tally.rss.get(early), tally.rss.get(late)
    rows += [
        ("load: requests (valid + malformed)", f"{tally.done} in {seconds:.0f} s, {args.clients} clients",
         f"≥ {args.requests}", tally.done >= args.requests),
        ("load: latency p50 / p95", f"{lat[len(lat) // 2]:.2f} / {lat[int(len(lat) * 0.95)]:.2f} s", "", None),
        ("load: server errors (other than intended messages)", f"{errors} ({c[('traceback', False)]} tracebacks)",
         "0", errors == 0),
        ("load: malformed requests with their message", f"{bad_ok}/{bad_all}", "all", bad_ok == bad_all and bad_all > 0),
        ("load: valid requests with the correct result", f"{valid_ok}/{valid_all}", "all", valid_ok == valid_all),
        (f"memory: RSS at request {late} vs {early}",
         f"{r_late or float('nan'):.0f} / {r_early or float('nan'):.0f} MB" if r_early and r_late else "not reached",
         "≤ +5 %", bool(r_early and r_late and r_late <= 1.05 * r_early)),
        (f"overload: {over['sent']} joins at once, refused as busy", f"{over['busy']}", "> 0", over["busy"] > 0),
        ("overload: slowest busy answer", f"{over['busy_max_s']:.2f} s", "< 1 s", over["busy"] > 0 and
         over["busy_max_s"] < 1.0),
        ("overload: accepted requests completed correctly", f"{over['completed_ok']}/{over['accepted']}", "all",
         over["accepted"] > 0 and over["completed_ok"] == over["accepted"] and over["other"] == 0),
        (f"memory: {args.cycles}× every curated model ({mem['loads']} loads), RSS vs one-model baseline",
         f"{mem['after']:.0f} / {mem['baseline']:.0f} MB (peak {mem['peak']:.0f})", "≤ +10 %",
         mem["ok"] and mem["after"] <= 1.10 * mem["baseline"]),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  {'measured':<34} {'target':<10} result")
    for name, value, target, ok in rows:
        print(f"{name:<{width}}  {value:<34} {target:<10} {'' if ok is None else 'PASS' if ok else 'FAIL'}")
    if tally.failures:
        print("\nfirst failures:")
        for f in tally.failures:
            print("  ", f)
    print(f"\ntotal {time.time() - t0:.0f} s (load phase ends at {t_load - t0:.0f} s, overload at "
          f"{t_over - t0:.0f} s, memory at {time.time() - t0:.0f} s)")
    return 0 if all(ok is not False for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
