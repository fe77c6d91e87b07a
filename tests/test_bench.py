"""The benchmark runs end to end with tiny settings and reports every target.

This checks that ``vit-explorer bench`` works and what it reports, never how fast anything is: the
timings on a shared test machine mean nothing, so no assertion looks at them.
"""
from __future__ import annotations

import json
import math

import pytest

from explorer import bench

#: Every target of the issue, as the rows that carry it ("[model]": vit = ViT-B/16 @224 role,
#: hightok = the 1370-token role, tnt = TNT). Cold-start rows are skipped under --quick.
TARGETS = [
    "explain.b1[vit]", "explain.b1[hightok]", "explain.b1[tnt]",
    "explain.batch[vit]", "explain.batch[hightok]", "explain.batch[tnt]",
    "compare.hooks[vit]", "compare.hooks[hightok]", "compare.hooks[tnt]",
    "compare.attention_extract[vit]", "compare.attention_extract[hightok]", "compare.attention_extract[tnt]",
    "views.computed[vit]", "views.computed[hightok]", "views.computed[tnt]",
    "views.app[vit]", "views.app[hightok]", "views.app[tnt]",
    "slider.latency[vit]", "slider.latency[hightok]", "slider.latency[tnt]",
    "slider.forward_passes[vit]", "slider.forward_passes[hightok]", "slider.forward_passes[tnt]",
    "rollout.speedup[hightok]", "rollout.agree[hightok]", "rollout.vs_hand[hightok]", "rollout.vs_hand[vit]",
    "memory.attention[hightok]", "memory.f16_error[hightok]",
    "embed.throughput[vit]", "embed.tsne[vit]",
]
SKIPPED_IN_QUICK = ["import.light[explorer]", "import.light[explorer.capture]"]
REPORTED = ["explain.public[vit]", "compare.capture_hooks[vit]", "compare.capture_ae[vit]",
            "slider.latency_photo[vit]", "rollout.speedup[vit]", "memory.peak_explain[hightok]",
            "embed.forward_only[vit]", "cold.first_page", "cold.first_explain", "cold.cli_explain",
            "import.explorer", "import.gradio"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    rc = bench.main(["--quick", "--threads", "1", "--json", str(path)])
    assert rc == 0  # without --strict a missed target never fails the command
    return json.loads(path.read_text())


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_every_target_row_has_a_number(report):
    rows = {r["id"]: r for r in report["rows"]}
    missing = [t for t in TARGETS if t not in rows]
    assert not missing, f"target rows missing: {missing}"
    for t in TARGETS:
        r = rows[t]
        assert r["status"] in ("PASS", "FAIL"), (t, r["status"], r["note"])
        assert _num(r["value"]), (t, r["value"])
        assert _num(r["threshold"]) and r["op"] in ("<=", ">="), t
        assert r["target"], t


def test_timed_rows_carry_median_min_max(report):
    for r in report["rows"]:
        for side in ("ours", "ref"):
            s = r[side]
            if s is None:
                continue
            assert s["n"] >= 1 and len(s["times_s"]) == s["n"], r["id"]
            assert s["min_s"] <= s["median_s"] <= s["max_s"], r["id"]


def test_other_rows_present_and_cold_start_skipped_in_quick(report):
    rows = {r["id"]: r for r in report["rows"]}
    for rid in REPORTED + SKIPPED_IN_QUICK:
        assert rid in rows, rid
    for rid in ("cold.first_page", "cold.first_explain", "import.explorer") + tuple(SKIPPED_IN_QUICK):
        assert rows[rid]["status"] == "skipped", rid
    assert not [r["id"] for r in report["rows"] if r["status"] == "ERROR"], \
        [(r["id"], r["note"]) for r in report["rows"] if r["status"] == "ERROR"]


def test_no_forward_pass_behind_a_slider(report):
    rows = {r["id"]: r for r in report["rows"]}
    for key in ("vit", "hightok", "tnt"):
        assert rows[f"slider.forward_passes[{key}]"]["value"] == 0


def test_memory_reported_per_case_and_summary(report):
    assert report["meta"]["memory_method"] in ("clear_refs", "sampled", "ru_maxrss")
    for case, info in report["cases"].items():
        if not info.get("skipped"):
            assert _num(info["peak_mb"]) and info["peak_mb"] > 0, case
    s = report["summary"]
    assert s["targets"] == sum(v for k, v in s.items() if k not in ("targets", "failed"))


def test_bad_arguments_are_refused():
    assert bench.main(["--cases", "nonsense"]) == 2
    assert bench.main(["--models", "resnet"]) == 2


def test_ratio_pairs_rounds_of_one_interleaved_run(monkeypatch):
    """A ratio between variants timed in the same rounds is the median of per-round ratios: a
    round in which the whole machine was slow cancels out. Otherwise it is a ratio of medians.

    Timed on a clock of the test's own (each call advances it by its cost; the second round runs
    on a machine three times slower), so the figures are exact on a loaded machine too."""
    import types

    from explorer import bench_core
    from explorer.bench_core import Stats, Timer, ratio

    clock = {"now": 0.0, "calls": 0}
    monkeypatch.setattr(bench_core, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))

    def costs(seconds):
        def f():
            clock["calls"] += 1
            slow = 3.0 if 2 < clock["calls"] <= 4 else 1.0  # round 2 (calls 3 and 4)
            clock["now"] += seconds * slow
        return f

    st, _ = Timer().interleave({"a": costs(0.002), "b": costs(0.001)}, repeats=3, warmup=0, memory=False)
    a, b = st["a"], st["b"]
    assert a.rounds == b.rounds is not None
    assert a.times == pytest.approx([0.002, 0.006, 0.002]) and b.times == pytest.approx([0.001, 0.003, 0.001])
    assert ratio(a, b) == pytest.approx(2.0)  # every round's ratio is 2
    assert ratio(Stats(a.times), Stats(b.times)) == pytest.approx(2.0)  # medians, unpaired: 2 ms / 1 ms
    # hand-made rounds: a machine three times slower in round 2 hits both sides
    a2, b2 = Stats([2.0, 6.0, 2.2], rounds=-1), Stats([1.0, 3.0, 1.0], rounds=-1)
    assert ratio(a2, b2) == pytest.approx(2.0)  # per round: 2.0, 2.0, 2.2
    assert ratio(Stats(a2.times), Stats(b2.times)) == pytest.approx(2.2 / 1.0)  # not paired: medians
    assert ratio(Stats([2.0, 6.0, 2.2], rounds=1), Stats([1.0, 3.0, 1.0], rounds=2)) == pytest.approx(2.2)


def test_batch_row_is_skipped_with_a_reason_when_memory_is_short(monkeypatch):
    """A batch of 32 DINOv2-S images at 1370 tokens keeps 8.1 GB of float16 attention alone: on a
    machine without the memory the row says what it needs instead of running out of memory."""
    from types import SimpleNamespace

    from explorer import bench_cases

    loaded = SimpleNamespace(facts=SimpleNamespace(layers=12, heads=6, tokens=1370, width=384), name="dinov2")
    attention = 32 * 12 * 6 * 1370 ** 2 * 2  # float16: above the float32 budget
    need = bench_cases._batch_bytes(loaded, 32)
    assert attention + 32 * 12 * 1370 ** 2 * 4 < need < 2 * attention
    monkeypatch.setattr(bench_cases, "_available_bytes", lambda: 4 * 2**30)
    row = bench_cases._explain_batch(SimpleNamespace(batch=32), loaded, "hightok", timer=None)
    assert row.id == "explain.batch[hightok]" and row.status == "skipped" and row.is_target
    assert f"needs about {need / 2**30:.1f} GB, 4.0 GB available" == row.note


@pytest.mark.parametrize("cgroup", [None, "v1", "v2", "v2-unlimited"])
def test_available_memory_respects_a_container_limit(tmp_path, cgroup):
    from explorer.bench_cases import _available_bytes

    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    cg = tmp_path / "sys/fs/cgroup"
    if cgroup == "v1":
        (cg / "memory").mkdir(parents=True)
        (cg / "memory/memory.limit_in_bytes").write_text(f"{8 * 2**30}\n")
        (cg / "memory/memory.usage_in_bytes").write_text(f"{3 * 2**30}\n")
    elif cgroup is not None:
        cg.mkdir(parents=True)
        (cg / "memory.max").write_text("max\n" if cgroup == "v2-unlimited" else f"{6 * 2**30}\n")
        (cg / "memory.current").write_text(f"{2**30}\n")
    expected = {None: 20000000 * 1024, "v1": 5 * 2**30, "v2": 5 * 2**30, "v2-unlimited": 20000000 * 1024}[cgroup]
    assert _available_bytes(str(tmp_path)) == expected
    assert _available_bytes(str(tmp_path / "nowhere")) is None
