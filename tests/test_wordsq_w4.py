"""bench/wordsq_w4.py without a GPU: the tile with both MMA operands in place compiles for sm90
with its operand layouts asserted free (a wrong k permutation would make the conversions move
data, and fail the compile), and its K step costs fewer instructions than "wordsg"'s, with x's
register moves gone and the words loaded 16 bytes at a time; the timing mode's one-line answers
where it cannot run (the float64 check runs on a GPU only: Gluon kernels do not run under the
Triton interpreter)."""

from __future__ import annotations

import os

# before any triton import: the module under test imports the kernels, and a triton imported
# compiled would break every interpreter test collected after this file (tests/test_kernels.py)
os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import wordsq_w4  # noqa: E402


def _steps(out: str) -> dict[tuple[str, str], tuple[float, float, float]]:
    """`--compile`'s rows: (scheme, variant) -> (instructions, moves, 16-byte loads) per K step."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 8 and parts[3] == "instr/step,":
            rows[(parts[0], parts[1])] = (float(parts[2]), float(parts[4]), float(parts[6]))
    return rows


@pytest.mark.skipif(not wordsq_w4.IMPORTED, reason="this triton has no Gluon")
def test_its_k_steps_compile_to_fewer_instructions_than_wordsg() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "bench/wordsq_w4.py", "--compile", "--variants", "quad", "quad-u1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if "no ptxas" in r.stdout or "(no SASS)" in r.stdout:
        pytest.skip("this triton build ships no ptxas / cuobjdump")
    assert all(" spill 0 B " in line for line in r.stdout.splitlines() if "regs" in line), r.stdout
    steps = _steps(r.stdout)
    assert set(steps) == {(s, v) for s in ("int4-g128", "mxfp4") for v in ("wordsg", "quad", "quad-u1")}
    for scheme in ("int4-g128", "mxfp4"):
        g, quad, one = steps[(scheme, "wordsg")], steps[(scheme, "quad")], steps[(scheme, "quad-u1")]
        # the words: 2 of 16 bytes a step (one per row of the thread's two), x: 8 as before
        assert (g[2], quad[2], one[2]) == (8, 10, 10)
        # x's operand pairs loaded in place: of "wordsg"'s moves only the loop's carried copies
        # remain with one step a loop step, and almost none with two
        assert one[1] < g[1] / 1.5 and quad[1] < g[1] / 3, (g, one, quad)
        assert quad[0] < one[0] < g[0], (g, one, quad)
    # mxfp4 gains most: one scale code per row and step for a thread's group of words, not one a word
    assert steps[("mxfp4", "quad")][0] < 0.7 * steps[("mxfp4", "wordsg")][0]


def test_the_timing_mode_says_why_it_cannot_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert wordsq_w4.main(["--shapes", "17x4096x4096"]) == 2
    assert capsys.readouterr().err.strip() == "--shapes: at most 16 rows of x"
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the bench would run")
    assert wordsq_w4.main([]) == 0
    assert "needs an NVIDIA GPU (sm80+)" in capsys.readouterr().err
