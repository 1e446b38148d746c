"""bench/wonly_sweep.py on CPU: every Hopper 4-bit candidate (the word tiles among them) pinned under
the Triton interpreter at a small shape agrees with float64, and a config that does not is a FAIL row
with exit status 1 -- the check the GPU sweep runs before it times anything."""

from __future__ import annotations

import subprocess

from bench_scripts import run_cpu

from server_shim.quant import tuning


def _sweep(*args: str) -> subprocess.CompletedProcess:
    return run_cpu("wonly_sweep.py", *args)


def test_every_hopper_4bit_candidate_passes_its_float64_check() -> None:
    r = _sweep()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert rows and all(line.startswith("ok") for line in rows)
    for scheme in ("int4-g128", "mxfp4"):
        assert any(scheme in line and " wordsk:" in line for line in rows), scheme
    assert r.stdout.rstrip().endswith("all checks passed")


def test_a_config_name_that_is_no_config_is_a_one_line_error() -> None:
    # an unknown path would have run as the default kernel and passed: refused before anything runs
    r = _sweep("--configs", "wordsk:16x64x128:w4:s4:k4", "nosuchpath:16x64x128:w4:s4:k4")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["wonly_sweep: unknown triton config path 'nosuchpath' (known: "
                                             + " ".join(sorted(tuning.PATHS)) + ")"]  # fmt: skip
    assert "ok " not in r.stdout


def test_an_unknown_path_filter_is_refused_not_an_empty_sweep() -> None:
    r = _sweep("--paths", "word")
    assert r.returncode == 2 and "invalid choice: 'word'" in r.stderr
    assert "all checks passed" not in r.stdout


def _module():
    """bench/wonly_sweep.py imported (its pure helpers; importing it runs nothing)."""
    import importlib.util

    from bench_scripts import ROOT

    spec = importlib.util.spec_from_file_location("wonly_sweep", ROOT / "bench" / "wonly_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cold_copies_span_four_l2s() -> None:
    """A bf16 4096 x 4096 weight (32 MiB) against a 50 MiB L2: 4 x 50 / 32 = 6.25, so 7 copies
    (224 MiB > 200); the packed int4 weight (8 MiB): 200 / 8 = 25, plus one, 26 copies (208 > 200);
    a weight larger than the span still gets a second copy to alternate with."""
    ws = _module()
    mib = 1 << 20
    assert ws.copies_for(32 * mib, 50 * mib) == 7
    assert ws.copies_for(8 * mib, 50 * mib) == 26
    assert 25 * 8 * mib <= 4 * 50 * mib < 26 * 8 * mib
    assert ws.copies_for(500 * mib, 50 * mib) == 2


def test_in_turn_runs_each_copy_once_in_order() -> None:
    ws = _module()
    seen: list[int] = []
    run = ws.in_turn(lambda i, j: seen.append(i + j) or i, [(1, 10), (2, 20), (3, 30)])
    assert run() == 3 and seen == [11, 22, 33]


def test_cold_is_accepted_on_cpu_where_nothing_is_timed() -> None:
    r = _sweep("--cold", "--configs", "wordsb:16x16x128:w4:s3:k1", "wordsg:16x16x128:w4:s1:k1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert len(rows) == 4 and all(line.startswith("ok") for line in rows)  # two configs x two schemes
