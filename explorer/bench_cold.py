"""Cold-start cases of :mod:`explorer.bench`, each in fresh subprocesses.

* ``imports``: what each import costs (``python -X importtime``: the summed cumulative time of the
  top-level imports, minus that of an empty interpreter) and which heavy packages a library import
  drags in.
* ``coldstart``: ``python -m explorer serve`` from the command to the first page served (HTTP 200
  on ``/``) and to the first explained example (``/explain`` called with ``gradio_client`` on a
  bundled example image), a few slider round trips over HTTP, and ``vit-explorer explain`` on one
  image from the command to its exit.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from .bench_core import Row, Stats

IMPORTS = ["explorer", "explorer.capture", "explorer.app.views", "explorer.app", "torch", "timm", "gradio",
           "sklearn"]
#: Packages the library path (load, explain, analyses) does not need at import time.
HEAVY = ["gradio", "sklearn", "plotly", "cv2", "matplotlib", "pandas", "timm"]
LIGHT_TARGETS = ("explorer", "explorer.capture")

IMPORT_ROWS = [f"import.{m}" for m in IMPORTS] + [f"import.light[{m}]" for m in LIGHT_TARGETS]
COLD_ROWS = ["cold.first_page", "cold.first_explain", "cold.http_slider", "cold.cli_explain"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    return env


def _importtime(code: str) -> tuple[float, float, str]:
    """(seconds of top-level imports, wall seconds, stdout) of ``python -X importtime -c code``."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                       env=_env(), timeout=300)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}")
    total_us = 0
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        parts = line.split("|")
        if len(parts) == 3 and not parts[2][1:].startswith(" "):  # top level: no nesting indent
            total_us += int(parts[1])
    return total_us / 1e6, wall, p.stdout.strip()


def case_imports(cfg: Any, models: Any = None, timer: Any = None) -> list[Row]:
    rows: list[Row] = []
    n = max(1, min(3, cfg.repeats))
    base = [_importtime("pass") for _ in range(n)]
    base_imp = sorted(b[0] for b in base)[n // 2]
    base_wall = sorted(b[1] for b in base)[n // 2]
    probe = "import sys; print(','.join(m for m in %r if m in sys.modules))" % (HEAVY,)
    for mod in IMPORTS:
        cfg.log(f"imports: {mod}")
        try:
            runs = [_importtime(f"import {mod}; {probe}") for _ in range(n)]
        except Exception as err:
            rows.append(Row(f"import.{mod}", "imports", f"import {mod}", status="ERROR", note=str(err)[:200]))
            continue
        imp = Stats([max(0.0, r[0] - base_imp) for r in runs])
        wall = Stats([max(0.0, r[1] - base_wall) for r in runs])
        heavy = [h for h in runs[-1][2].split(",") if h]
        rows.append(Row(f"import.{mod}", "imports", f"import {mod} (python -X importtime, minus an empty interpreter)",
                        ours=imp, value=imp.median, unit="s",
                        note=f"wall {wall.median:.2f} s; heavy packages loaded: {', '.join(heavy) or 'none'}",
                        extra={"wall": wall.to_json(), "heavy_loaded": heavy}))
        if mod in LIGHT_TARGETS:
            rows.append(Row(f"import.light[{mod}]", "imports",
                            f"heavy packages ({', '.join(HEAVY)}) loaded by 'import {mod}'",
                            value=float(len(heavy)), unit="count", op="<=", threshold=0.0,
                            note=", ".join(heavy) or "none").judge())
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as r:
        r.read(1)
        return r.status


def _example() -> str:
    from .zoo import assets_dir

    shapes = sorted((assets_dir() / "examples" / "shapes").rglob("*.png"))
    shapes = [p for p in shapes if not p.name.endswith(".mask.png")]
    star = [p for p in shapes if "star" in p.name]
    if not (star or shapes):
        raise FileNotFoundError("no example image under assets/examples/shapes")
    return str((star or shapes)[0])


def _args_for(client: Any, api_name: str, image: Any = None) -> list[Any]:
    """Positional arguments for an endpoint: the image where an Image is expected, defaults elsewhere."""
    info = client.view_api(return_format="dict", print_info=False)
    params = info["named_endpoints"][api_name]["parameters"]
    args = []
    for p in params:
        if image is not None and p.get("component") == "Image":
            args.append(image)
        else:
            args.append(p.get("parameter_default") if p.get("parameter_has_default") else None)
    return args


def case_coldstart(cfg: Any, models: Any = None, timer: Any = None) -> list[Row]:
    from gradio_client import Client, handle_file

    rows: list[Row] = []
    example = _example()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log_path = Path(cfg.workdir) / "serve.log"
    cfg.log(f"coldstart: python -m explorer serve --port {port} (log {log_path})")
    env = _env()  # proxies are bypassed for 127.0.0.1 (NO_PROXY here, ProxyHandler in _get)
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "explorer", "serve", "--port", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            t_page = None
            while time.perf_counter() - t0 < 300:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {proc.returncode}; see {log_path}")
                try:
                    if _get(url) == 200:
                        t_page = time.perf_counter() - t0
                        break
                except OSError:
                    pass
                time.sleep(0.1)
            if t_page is None:
                raise TimeoutError("no page within 300 s")
            rows.append(Row("cold.first_page", "coldstart", "python -m explorer serve → first page served (HTTP 200)",
                            ours=Stats([t_page]), value=t_page, unit="s"))
            old = {k: os.environ.get(k) for k in ("NO_PROXY", "no_proxy")}
            os.environ.update({"NO_PROXY": env["NO_PROXY"], "no_proxy": env["no_proxy"]})
            try:
                client = Client(url, verbose=False)
                t1 = time.perf_counter()
                client.predict(*_args_for(client, "/explain", handle_file(example)), api_name="/explain")
                t_exp = time.perf_counter() - t0
                rows.append(Row("cold.first_explain", "coldstart",
                                f"python -m explorer serve → first example explained (/explain via gradio_client, "
                                f"{Path(example).name}, model load included)", ours=Stats([t_exp]), value=t_exp,
                                unit="s", note=f"the /explain call itself {time.perf_counter() - t1:.2f} s"))
                rt = []
                args = _args_for(client, "/attention")
                for i in range(max(3, cfg.repeats)):
                    t2 = time.perf_counter()
                    client.predict(*args, api_name="/attention")
                    rt.append(time.perf_counter() - t2)
                rows.append(Row("cold.http_slider", "coldstart",
                                "a slider event (/attention) over HTTP through gradio_client: server work + queue + "
                                "image encoding + transfer", ours=Stats(rt), value=Stats(rt).median * 1e3, unit="ms"))
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        except Exception as err:
            done = {r.id for r in rows}
            rows += [Row(rid, "coldstart", "server cold start", status="ERROR", note=f"{type(err).__name__}: {err}"[:200])
                     for rid in COLD_ROWS[:3] if rid not in done]
        finally:
            _stop(proc)
    out = Path(cfg.workdir) / "cli_out"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "explorer", "explain", example, "--model", "classroom-vit",
                        "--out", str(out), "-q"], capture_output=True, text=True, env=env, timeout=300)
    t_cli = time.perf_counter() - t0
    if p.returncode == 0:
        rows.append(Row("cold.cli_explain", "coldstart", "vit-explorer explain <example> --model classroom-vit: "
                        "command → files written → exit", ours=Stats([t_cli]), value=t_cli, unit="s"))
    else:
        rows.append(Row("cold.cli_explain", "coldstart", "vit-explorer explain", status="ERROR",
                        note=(p.stderr.strip().splitlines() or ["?"])[-1][:200]))
    return rows


def _stop(proc: subprocess.Popen) -> None:
    """End the server this case started (its own process group), politely first."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (subprocess.TimeoutExpired, ProcessLookupError, PermissionError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def skipped_rows(case: str, why: str) -> list[Row]:
    ids = IMPORT_ROWS if case == "imports" else COLD_ROWS
    targets = {f"import.light[{m}]" for m in LIGHT_TARGETS}
    return [Row(rid, case, why, op="<=" if rid in targets else None, threshold=0.0 if rid in targets else None,
                unit="count" if rid in targets else "s", status="skipped") for rid in ids]


CASES = {"imports": case_imports, "coldstart": case_coldstart}
