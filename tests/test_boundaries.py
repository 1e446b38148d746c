"""docs/design.md "Boundaries": difftest runs without torch, triton or fastapi (someone comparing two
deployed servers installs httpx, numpy, sacrebleu and safetensors only), and the launcher starts
servers without loading a model."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import difftest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = "import sys\nfor m in ('torch', 'triton', 'fastapi', 'transformers', 'uvicorn'):\n    sys.modules[m] = None\n"


def test_every_difftest_module_imports_without_torch_triton_fastapi() -> None:
    modules = sorted(
        m.name for m in pkgutil.walk_packages(difftest.__path__, "difftest.") if m.name != "difftest.__main__"
    )
    assert "difftest.runner" in modules and "difftest.whitebox.layers" in modules
    code = BLOCK + f"import importlib\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
    code += "import server_shim.launch, server_shim.launch_spec\nprint('ok')\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
