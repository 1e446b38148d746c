"""bench/load.py runs in CI, small: a launched shim under concurrent clients answers every request
(no 5xx, no transport error), reports its figures, and survives abandoned requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_load_bench_small_run_has_no_errors(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load.py"), "--clients", "8", "--requests", "24",
         "--max-seconds", "240", "--abandon", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=540, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["status"] == {"200": 24} and figures["transport_errors"] == {}
    assert figures["after_abandon_status"] == 200 and figures["abandoned"] == 4
    assert figures["rss_before_mib"] > 0 and figures["p99_s"] >= figures["p50_s"] > 0
