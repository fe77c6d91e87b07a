"""Launch the real app (``python -m explorer serve``) on a free loopback port for a test session."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(extra_env: dict | None = None, timeout: float = 120.0):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "VIT_EXPLORER_ASSETS": str(ROOT / "assets"), **(extra_env or {})}
    log = open(ROOT / "tests" / f".app-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "explorer", "serve", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with {proc.returncode}: {Path(log.name).read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc, url, Path(log.name)
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("app did not answer in time")


@contextlib.contextmanager
def running_app(extra_env: dict | None = None):
    """The app in a subprocess for the duration of a ``with``: ``(proc, url, log)``; stopped after."""
    proc, url, log = start_app(extra_env)
    try:
        yield proc, url, log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def app_url():
    with running_app() as (_, url, _log):
        yield url


@pytest.fixture(autouse=False)
def real_assets(monkeypatch):
    """Tests of the app load the shipped classroom models in this process too."""
    from explorer import zoo

    monkeypatch.setenv("VIT_EXPLORER_ASSETS", str(ROOT / "assets"))
    zoo.CACHE.clear()
    yield
    zoo.CACHE.clear()
