"""Running a bench/ script's CPU mode from a test: its checks under the Triton interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cpu(script: str, *args: str) -> subprocess.CompletedProcess:
    """`python bench/<script> --device cpu <args>` from the repository root (on PYTHONPATH), the
    interpreter switched on, output captured."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--device", "cpu", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
