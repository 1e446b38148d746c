"""bench/xstat_w4.py on CPU: the x-stationary int4 tile computes the int4-g128 product against float64
under the Triton interpreter, twice in a row (its K chunks' counters reset themselves), and a tile
count that does not divide the problem is a one-line error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from bench_scripts import run_cpu

ROOT = Path(__file__).resolve().parents[1]


def test_the_x_stationary_tile_matches_float64_twice() -> None:
    r = run_cpu("xstat_w4.py", "--tiles", "1", "4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "ok   xstat tiles 1 s2 at 16x64x1024",
        "ok   xstat tiles 4 s2 at 16x64x1024",
    ]
    for line in lines:
        assert float(line.split("rel err ")[1].split()[0]) < 1e-6  # fp32 out: only fp32 accumulation differs


def test_tiles_that_do_not_divide_the_problem_are_refused() -> None:
    r = run_cpu("xstat_w4.py", "--tiles", "3")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "xstat_w4: [3] tiles of 16 x 4 steps of 128 do not divide 64 x 1024"
    ]


def test_the_tile_compiles_for_sm90_without_spills() -> None:
    """--compile (no GPU): ptxas assembles the tile with the shim's inline-PTX planes, beside "wordsb"."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "bench/xstat_w4.py", "--compile", "--tiles", "4", "--stages", "2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if "no ptxas" in r.stdout:
        pytest.skip("this triton build ships no ptxas")
    lines = r.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["wordsb (anatomy copy) s2", "xstat tiles 4 s2"]
    assert all(" spill 0 B " in line and "mma 16" in line for line in lines), lines
