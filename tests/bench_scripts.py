"""Running a bench/ script's CPU mode from a test: its checks under the Triton interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cpu(script: str, *args: str) -> subprocess.CompletedProcess:
    """`python bench/<script> --device cpu <args>` from the repository root (on PYTHONPATH), output
    captured. TRITON_INTERPRET is left unset, as in a user's shell: `--device cpu` must switch the
    interpreter on itself (gemm.py, word_tiles_check.py and wonly_sweep.py once did it too late:
    a traceback that this helper, setting it for them, hid)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--device", "cpu", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
