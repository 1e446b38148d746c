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
