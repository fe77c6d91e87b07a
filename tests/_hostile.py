"""Helpers for the tests that attack the running app: hostile files made on the fly, a raw queue
client (for payloads gradio_client will not send), a fake model hub and an HTTP sink on loopback."""
from __future__ import annotations

import http.server
import io
import json
import socket
import struct
import threading
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CONTROLS = ("mean", 0.0, 1, 0.55, True, 1)  # fusion, discard, start_layer, opacity, show_mask, inner_layer


# ----------------------------------------------------------------------------- files

def png(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **kw)
    return buf.getvalue()


def noise(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(w: int = 20000, h: int = 20000, rgb: bool = False) -> bytes:
    """A valid PNG of zeros declaring ``w``×``h`` pixels: a few KB (1-bit grey) or a few hundred KB
    (8-bit RGB, every row present, so a decoder that trusted it would really fill the memory).

    The zlib stream is one compressed block of rows repeated: after a full flush deflate starts
    afresh, so identical input gives identical bytes, and only the checksum needs all the data.
    """
    bit_depth, colour, row = (8, 2, 3 * w + 1) if rgb else (1, 0, (w + 7) // 8 + 1)
    rows_per_block = 64
    block = b"\x00" * row * rows_per_block
    n, rest = divmod(h, rows_per_block)
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = co.compress(block) + co.flush(zlib.Z_FULL_FLUSH)
    tail_co = zlib.compressobj(9, zlib.DEFLATED, -15)
    tail = tail_co.compress(b"\x00" * row * rest) + tail_co.flush()
    adler = 1
    for _ in range(n):
        adler = zlib.adler32(block, adler)
    adler = zlib.adler32(b"\x00" * row * rest, adler)
    idat = b"\x78\xda" + chunk * n + tail + struct.pack(">I", adler & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def write(folder: Path, name: str, data: bytes) -> str:
    p = folder / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return str(p)


# ----------------------------------------------------------------------------- raw queue client

def app_config(url: str) -> dict:
    with urllib.request.urlopen(url + "config", timeout=10) as r:
        return json.load(r)


def raw_join(url: str, api_name: str, data: list, session: str | None = None,
             timeout: float = 60.0, config: dict | None = None) -> tuple[int, str, str]:
    """Join the queue directly with ``data`` (state inputs filled in with None).
    Returns ``(http status, session hash, response body)``: 200 when queued, 503 when full.
    ``config``: the app's /config, fetched here when not given."""
    cfg = config if config is not None else app_config(url)
    dep = next(d for d in cfg["dependencies"] if d.get("api_name") == api_name)
    types = {c["id"]: c["type"] for c in cfg["components"]}
    defaults = {c["id"]: c.get("props", {}).get("value") for c in cfg["components"]}
    it = iter(data)
    # inputs after the ones given take the component's default value, as gradio_client does
    full = [None if types[i] == "state" else next(it, defaults.get(i)) for i in dep["inputs"]]
    session = session or uuid.uuid4().hex[:12]
    body = json.dumps({"data": full, "fn_index": dep["id"], "session_hash": session, "event_data": None,
                       "trigger_id": None}).encode()
    req = urllib.request.Request(url + "gradio_api/queue/join", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, session, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, session, e.read().decode("utf-8", "replace")[:500]


def raw_wait(url: str, session: str, timeout: float = 120.0) -> dict:
    """The final event of the session's queued request."""
    last: dict = {}
    with urllib.request.urlopen(url + f"gradio_api/queue/data?session_hash={session}", timeout=timeout) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data:"):
                last = json.loads(line[5:])
                if last.get("msg") in ("process_completed", "close_stream"):
                    break
    return last


def raw_call(url: str, api_name: str, data: list, timeout: float = 60.0) -> dict:
    """Join and wait; ``{"status": code, "body": ...}`` when the join itself is refused."""
    status, session, body = raw_join(url, api_name, data, timeout=timeout)
    if status != 200:
        return {"status": status, "body": body}
    return raw_wait(url, session, timeout)


def upload(url: str, path: str | Path) -> str:
    """Upload a file the way the browser does; returns its path on the server."""
    path = Path(path)
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{path.name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url + "gradio_api/upload", body,
                                 {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)[0]


def file_data(path: str | None = None, url: str | None = None, name: str = "image.png") -> dict:
    return {"path": path, "url": url, "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def http_status(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
                timeout: float = 10.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ----------------------------------------------------------------------------- loopback servers

class Sink:
    """An HTTP server on 127.0.0.1 that records every request it gets (and serves a real PNG)."""

    def __init__(self) -> None:
        hits = self.hits = []
        body = png(noise())

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_HEAD = do_POST = do_GET  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeHub:
    """A stand-in for the model hub on 127.0.0.1: ``mode = "refuse"`` drops every connection at
    once (unreachable), ``"stall"`` accepts and never answers (a hub or proxy that hangs)."""

    def __init__(self) -> None:
        self.mode = "refuse"
        self.connections = 0
        self._held: list[socket.socket] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.mode == "stall":
                self._held.append(conn)
            else:
                conn.close()

    def close(self) -> None:
        for c in self._held:
            c.close()
        self.sock.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
