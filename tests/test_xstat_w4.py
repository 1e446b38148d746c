"""bench/xstat_w4.py on CPU: the x-stationary int4 tile computes the int4-g128 product against float64
under the Triton interpreter, twice in a row (its K chunks' counters reset themselves), and a tile
count that does not divide the problem is a one-line error."""

from __future__ import annotations

from bench_scripts import run_cpu


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
