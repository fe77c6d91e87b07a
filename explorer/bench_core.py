"""Timing, memory and reporting for :mod:`explorer.bench`: no model code here.

Timing: ``time.perf_counter`` around each call (with ``torch.cuda.synchronize`` on a GPU), warm-up
calls first, then the compared variants interleaved in rotating order (A,B,C / B,C,A / C,A,B ...)
so that machine noise and cache state hit every variant alike. A ratio between two variants of one
interleaved run is the median of their per-round ratios (a machine slowdown that lasts a round
cancels out); other ratios are ratios of medians.

Memory: the RSS high-water mark of this process, reset before each measured call by writing ``5``
to ``/proc/self/clear_refs`` (Linux) and read back from ``VmHWM`` afterwards; reported as the
peak above the RSS just before the call. Where that reset is not allowed, a thread samples
``VmRSS`` every millisecond instead; without ``/proc`` the process-wide ``ru_maxrss`` is reported
(not reset per call). On a GPU the CUDA allocator's peak is reported too.
"""
from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

MB = 2 ** 20


# ----------------------------------------------------------------------------- memory

def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryProbe:
    """RSS high-water mark since the last :meth:`reset` (and the CUDA allocator's peak), in bytes."""

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self.method = self._pick_method()
        self._max = 0
        self._thread: threading.Thread | None = None

    @staticmethod
    def _pick_method() -> str:
        if _status_kb("VmRSS") is None:
            return "ru_maxrss"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return "clear_refs"
        except OSError:
            return "sampled"

    def describe(self) -> str:
        return {
            "clear_refs": "peak RSS = VmHWM after resetting it through /proc/self/clear_refs before each "
                          "measured call (in-process, exact); shown as MB above the RSS just before the call",
            "sampled": "peak RSS = VmRSS sampled every 1 ms by a thread (in-process); shown as MB above the "
                       "RSS just before the call",
            "ru_maxrss": "process peak RSS so far (ru_maxrss; cannot be reset per call)",
        }[self.method]

    def rss(self) -> int:
        kb = _status_kb("VmRSS")
        if kb is not None:
            return kb * 1024
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024

    def reset(self) -> None:
        if self.method == "clear_refs":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        elif self.method == "sampled":
            self._max = self.rss()
            if self._thread is None:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        if self.cuda:
            import torch
            torch.cuda.reset_peak_memory_stats()

    def _sample(self) -> None:
        while True:
            self._max = max(self._max, (_status_kb("VmRSS") or 0) * 1024)
            time.sleep(0.001)

    def peak(self) -> int:
        """Highest RSS since the last reset."""
        if self.method == "clear_refs":
            return (_status_kb("VmHWM") or 0) * 1024
        if self.method == "sampled":
            return max(self._max, self.rss())
        return self.rss()

    def gpu_peak(self) -> int:
        import torch
        return torch.cuda.max_memory_allocated()


# ----------------------------------------------------------------------------- timing

@dataclass
class Stats:
    """Seconds of repeated calls. ``rounds``: the id of the :meth:`Timer.interleave` call that
    timed them; ``times[r]`` of every variant of that call is then from the same round ``r``."""

    times: list[float]
    rounds: int | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else math.nan

    @property
    def min(self) -> float:
        return min(self.times) if self.times else math.nan

    @property
    def max(self) -> float:
        return max(self.times) if self.times else math.nan

    def to_json(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "n": len(self.times),
                "times_s": [round(t, 6) for t in self.times]}


class Timer:
    """Runs callables with warm-up, interleaving and per-call memory peaks; tracks each case's peak."""

    _interleaves = 0

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self.probe = MemoryProbe(cuda)
        self._case_rss0 = 0
        self._case_high = 0
        self._case_gpu = 0

    def sync(self) -> None:
        if self.cuda:
            import torch
            torch.cuda.synchronize()

    def case_start(self) -> None:
        gc.collect()
        # what exists now (models, gradio, plotly) is never garbage: keep the per-call collections cheap
        gc.freeze()
        self._case_rss0 = self._case_high = self.probe.rss()
        self._case_gpu = 0
        self.probe.reset()

    def case_end(self) -> dict[str, float]:
        """Peak RSS of the whole case: absolute, and above the RSS at its start."""
        high = max(self._case_high, self.probe.peak())
        out = {"peak_mb": high / MB, "delta_mb": max(0, high - self._case_rss0) / MB}
        if self.cuda:
            out["gpu_peak_mb"] = max(self._case_gpu, self.probe.gpu_peak()) / MB
        return out

    def once(self, fn: Callable[[], Any], memory: bool = False) -> tuple[Any, float, dict[str, float]]:
        """One timed call: (result, seconds, {"peak_mb", "delta_mb"[, "gpu_peak_mb"]} or {})."""
        gc.collect()
        if memory:
            self._case_high = max(self._case_high, self.probe.peak())
            base = self.probe.rss()
            gpu0 = __import__("torch").cuda.memory_allocated() if self.cuda else 0
            self.probe.reset()
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        dt = time.perf_counter() - t0
        mem: dict[str, float] = {}
        if memory:
            peak = self.probe.peak()
            self._case_high = max(self._case_high, peak)
            mem = {"peak_mb": peak / MB, "delta_mb": max(0, peak - base) / MB}
            if self.cuda:
                gp = self.probe.gpu_peak()
                self._case_gpu = max(self._case_gpu, gp)
                mem["gpu_peak_mb"] = max(0, gp - gpu0) / MB
        return out, dt, mem

    def interleave(self, variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                   memory: bool = True) -> tuple[dict[str, Stats], dict[str, dict[str, float]]]:
        """Time every variant ``repeats`` times, rotating the order each round.

        Returns per-variant :class:`Stats` and the largest memory peak seen per variant.
        """
        names = list(variants)
        for _ in range(warmup):
            for n in names:
                variants[n]()
        times: dict[str, list[float]] = {n: [] for n in names}
        peaks: dict[str, dict[str, float]] = {n: {} for n in names}
        for r in range(repeats):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                out, dt, mem = self.once(variants[n], memory)
                del out
                times[n].append(dt)
                for key, v in mem.items():
                    peaks[n][key] = max(peaks[n].get(key, 0.0), v)
        Timer._interleaves += 1
        return {n: Stats(t, Timer._interleaves) for n, t in times.items()}, peaks


# ----------------------------------------------------------------------------- rows

@dataclass
class Row:
    """One line of the report. ``value`` is what the target checks (a ratio, seconds, MB ...)."""

    id: str  # e.g. "explain.b1[vit]": stable, used by the tests and the JSON
    case: str
    what: str
    ours: Stats | None = None
    ref: Stats | None = None
    ref_name: str = ""  # what "ref" is: "plain forward", "hand-written hooks", ...
    value: float | None = None
    unit: str = "x"  # "x" ratio, "s", "ms", "MB", "count", "abs"
    op: str | None = None  # "<=" or ">=": a target; None: reported only
    threshold: float | None = None
    status: str = "info"  # PASS, FAIL, info, skipped, ERROR
    mem: dict[str, float] = field(default_factory=dict)  # peak of our side, MB
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_target(self) -> bool:
        return self.op is not None

    def judge(self) -> "Row":
        if self.status in ("skipped", "ERROR") or self.op is None:
            return self
        if self.value is None or not math.isfinite(self.value):
            self.status = "ERROR"
            self.note = (self.note + " no value").strip()
            return self
        ok = self.value <= self.threshold if self.op == "<=" else self.value >= self.threshold  # type: ignore[operator]
        self.status = "PASS" if ok else "FAIL"
        if not ok and self.threshold == 1.0 and self.ours and self.ref and self.ours.min <= self.ref.max \
                and self.ref.min <= self.ours.max:  # "not slower than theirs" between near-equal workloads
            self.note = (self.note + " · min–max ranges overlap: the miss may be noise").lstrip(" ·")
        return self

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ours"] = self.ours.to_json() if self.ours else None
        d["ref"] = self.ref.to_json() if self.ref else None
        d["target"] = self.target_text()
        return d

    def target_text(self) -> str:
        if self.op is None:
            return ""
        return f"{self.op} {_num(self.threshold, self.unit)}"


def ratio(a: Stats, b: Stats) -> float:
    """How many times b's time a takes: the median of the per-round ratios a[r] / b[r] when both
    were timed in the same rounds of one :meth:`Timer.interleave` (each round runs every variant
    back to back, so a slowdown of the shared machine that lasts a round cancels out), else
    median(a) / median(b)."""
    if a.rounds is not None and a.rounds == b.rounds and len(a.times) == len(b.times) and min(b.times) > 0:
        return statistics.median(x / y for x, y in zip(a.times, b.times))
    return a.median / b.median if b.median > 0 else math.nan


def _num(v: float | None, unit: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if unit == "x":
        return f"{v:.3g}x" if v < 100 else f"{v:.0f}x"
    if unit == "ms":
        return f"{v:.1f} ms"
    if unit == "s":
        return f"{v:.2f} s"
    if unit == "MB":
        return f"{v:.0f} MB"
    if unit == "count":
        return f"{v:.0f}"
    return f"{v:.1e}"


def _stats_text(s: Stats | None) -> str:
    if s is None or not s.times:
        return "-"
    scale, u = (1e3, "ms") if s.median < 1 else (1.0, "s")
    d = 1 if u == "ms" else 2
    return f"{s.median * scale:.{d}f} [{s.min * scale:.{d}f}–{s.max * scale:.{d}f}] {u}"


def format_table(rows: Sequence[Row]) -> str:
    head = ("row", "ours: median [min–max]", "reference: median [min–max]", "value", "target", "status",
            "peak MB")
    lines = []
    body = []
    for r in rows:
        ref = _stats_text(r.ref) + (f" ({r.ref_name})" if r.ref is not None and r.ref_name else "")
        peak = f"+{r.mem['delta_mb']:.0f}" if "delta_mb" in r.mem else ""
        if "gpu_peak_mb" in r.mem:
            peak += f" gpu+{r.mem['gpu_peak_mb']:.0f}"
        body.append((r.id, _stats_text(r.ours), ref, _num(r.value, r.unit), r.target_text(), r.status, peak))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines.append(fmt.format(*head))
    lines.append("  ".join("-" * w for w in widths))
    last_case = None
    for r, b in zip(rows, body):
        if last_case is not None and r.case != last_case:
            lines.append("")
        last_case = r.case
        lines.append(fmt.format(*b).rstrip())
        text = r.what + (f" · {r.note}" if r.note else "")
        lines.append("    " + text)
    return "\n".join(lines)


def write_json(path: str | os.PathLike, meta: dict[str, Any], rows: Sequence[Row],
               cases: dict[str, Any]) -> None:
    doc = {"meta": meta, "rows": [r.to_json() for r in rows], "cases": cases,
           "summary": summary(rows)}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, default=_json_default)


def _json_default(o: Any) -> Any:
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    return str(o)


def summary(rows: Sequence[Row]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for r in rows:
        if r.is_target:
            counts[r.status] = counts.get(r.status, 0) + 1
    return {"targets": sum(counts.values()), **counts,
            "failed": [r.id for r in rows if r.is_target and r.status in ("FAIL", "ERROR")]}
