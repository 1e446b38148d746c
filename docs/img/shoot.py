"""The README's two report screenshots, from a `make run` report folder.

Why a script: the pictures go stale with every change to the verdicts or the page, and a picture
whose numbers no run printed is a README that is not true. This re-makes both from one run:

- `report-default.png`: the first screen (1280 x 800) of the run's report.html as written;
- `report-failing.png`: the same run re-rendered (`difftest report`, which re-derives every
  verdict's expectation and the gate from report.json) with the negative controls declared
  `expect = "pass"`, so the gate fails.

    python docs/img/shoot.py runs/default            # needs Chromium (apt-get install chromium)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))
from cdp_pipe import Browser, find_chromium  # noqa: E402

from difftest.cli import main as difftest  # noqa: E402

WIDTH, HEIGHT = 1280, 800


def declare_controls_passing(folder: Path) -> list[str]:
    """Rewrite report.json so every `expect = "fail"` target expects a pass; returns their names."""
    path = folder / "report.json"
    data = json.loads(path.read_text())
    flipped = []
    for target in data["targets"]:
        if target.get("expect") == "fail":
            target["expect"] = "pass"
            if target.get("verdict"):
                target["verdict"]["expect"] = "pass"
            flipped.append(target["name"])
    path.write_text(json.dumps(data))
    return flipped


def die(message: str) -> None:
    """A usage problem: one line and exit 2, as difftest's own CLI does."""
    print(f"shoot.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def shoot(browser: Browser, report_html: Path, out: Path) -> None:
    browser.viewport(WIDTH, HEIGHT)
    browser.open(report_html)
    browser.screenshot(out)
    print(f"wrote {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "run", type=Path, help="a report folder written by `difftest run` (make run: runs/default)"
    )
    ap.add_argument("--out", type=Path, default=HERE, help="where the PNGs go (default: docs/img)")
    args = ap.parse_args()
    if not (args.run / "report.json").is_file():
        die(f"{args.run}: no report.json (run `make run` first)")
    args.out.mkdir(parents=True, exist_ok=True)
    chromium = find_chromium()
    if chromium is None:
        die("no Chromium found: apt-get install -y chromium, or set DIFFTEST_CHROMIUM")
    with tempfile.TemporaryDirectory(prefix="difftest-shoot-") as tmp:
        failing = Path(tmp) / "failing"
        shutil.copytree(args.run, failing)
        if not declare_controls_passing(failing):
            die(f"{args.run}: no target expects a failure, so no failing gate to show")
        with contextlib.redirect_stdout(io.StringIO()):  # in-process: whatever python runs this
            rc = difftest(["report", str(failing), "--json"])
        if rc != 1:
            die(f"the re-rendered report's gate did not fail (exit {rc})")
        browser = Browser(chromium, WIDTH, HEIGHT)
        try:
            shoot(browser, args.run / "report.html", args.out / "report-default.png")
            shoot(browser, failing / "report.html", args.out / "report-failing.png")
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
