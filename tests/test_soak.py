"""The short soak: ``python -m explorer.soak --short`` against a real server (a few seconds per
figure), and the random-weights switch it relies on to cycle through the curated models offline."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_random_weights_switch_builds_timm_names_offline(monkeypatch, clean_cache):
    from explorer import zoo
    from explorer.errors import HubUnreachableError

    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    with pytest.raises(HubUnreachableError):  # HF_HUB_OFFLINE=1 (conftest): no weights without the switch
        zoo.load_model(name, use_cache=False)
    monkeypatch.setenv(zoo.RANDOM_WEIGHTS_ENV, "1")
    m = zoo.load_model(name, use_cache=False)
    assert m.source == "random" and m.name == name and len(m.label_names) == 1000
    assert zoo.load_model("classroom-vit", use_cache=False).source == "bundled"  # bundled models keep theirs


def test_memory_cycle_covers_every_curated_model():
    from explorer import zoo
    from explorer.soak import CURATED_SMALL

    assert list(CURATED_SMALL) == zoo.CURATED


def test_short_soak_passes():
    proc = subprocess.run([sys.executable, "-m", "explorer.soak", "--short"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    table = proc.stdout
    assert proc.returncode == 0, table + proc.stderr[-3000:]
    rows = [ln for ln in table.splitlines() if ln.rstrip().endswith(("PASS", "FAIL"))]
    assert len(rows) == 9 and all(ln.rstrip().endswith("PASS") for ln in rows), table
    for figure in ("server errors", "malformed requests with their message", "RSS at request",
                   "refused as busy", "slowest busy answer", "every curated model"):
        assert figure in table
