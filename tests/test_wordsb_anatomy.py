"""bench/wordsb_anatomy.py on CPU: its standalone "wordsb" copy computes the int4-g128 product (against
float64, under the Triton interpreter), its "no dequantization" variant does not -- so the check that
guards the GPU timings is one a broken tile fails -- and a tile that does not divide the problem is
a one-line error, not a run of a wrong shape."""

from __future__ import annotations

from bench_scripts import run_cpu


def test_the_whole_tile_matches_float64_and_the_gutted_one_does_not() -> None:
    r = run_cpu("wordsb_anatomy.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("ok   whole wordsb 16x128 w4 s3 at 16x64x1024")
    err = float(lines[0].split("rel err ")[1].split()[0])
    assert err < 1e-6  # fp32 out on the CPU: only fp32 accumulation separates it from float64
    gutted = float(lines[1].split("rel err ")[1].split()[0])
    assert not gutted < 0.5  # far off, or NaN


def test_a_tile_that_does_not_divide_the_problem_is_refused() -> None:
    r = run_cpu("wordsb_anatomy.py", "--tile", "16x96")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "wordsb_anatomy: tile 16x96 with 4 steps does not divide 64 x 1024"
    ]
