"""`make setup`'s torch rule: a torch already importable is kept; otherwise torch==2.13.0, the CPU
wheel unless an NVIDIA driver is there (PyPI's default Linux wheel is the multi-GB CUDA build)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = (
    "--no-deps --retries 1 --timeout 20 --index-url https://download.pytorch.org/whl/cpu torch==2.13.0"
)


def _torch_line(path: str) -> str:
    """The torch install command `make setup` would run with this PATH (dry run, forced)."""
    r = subprocess.run(["make", "-n", "-B", "setup", "PY=/no/such/python"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PATH": path})  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.replace("\\\n", " ").splitlines() if "torch==" in x]
    assert len(lines) == 1, r.stdout
    return lines[0]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_the_cpu_wheel_without_an_nvidia_driver_and_pypis_with_one(tmp_path: Path) -> None:
    bare = f"{tmp_path}:{os.path.dirname(shutil.which('make') or '/usr/bin')}:/bin"
    if any((Path(d) / "nvidia-smi").exists() for d in bare.split(":")):
        pytest.skip("nvidia-smi is installed here")
    line = _torch_line(bare)
    assert 'import torch" 2>/dev/null ||' in line  # kept when importable
    assert CPU_INDEX in line  # the CPU wheel alone first, then its dependencies from PyPI
    assert line.rstrip("; }").endswith("-m pip install -q torch==2.13.0")
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    line = _torch_line(bare)
    assert "download.pytorch.org" not in line and line.rstrip("; }").endswith(
        "-m pip install -q torch==2.13.0"
    )
