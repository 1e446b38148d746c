"""Renderers of a RunResult: report.md, report.html, report.json, junit.xml and plots/*.svg.

    write_report(run, out_dir)     every file, each written atomically, mode 0644
    load_run(path)                 report.json (or its folder) -> RunResult, schema checked
    render_summary / render_side_by_side   the terminal views (difftest.report.terminal)

Renderers only read the result model; nothing here computes a verdict or queries a server, so
`difftest report DIR` re-renders from report.json alone.
"""

from __future__ import annotations

from pathlib import Path

from difftest.errors import output_error
from difftest.report.html import render_html
from difftest.report.jsonio import atomic_write_text, load_run, run_to_json
from difftest.report.junit import render_junit
from difftest.report.markdown import render_markdown
from difftest.report.plots import run_plots
from difftest.results import RunResult

__all__ = ["write_report", "load_run", "render_markdown", "render_html", "render_junit", "run_to_json"]

PLOTS_DIR = "plots"


def write_report(run: RunResult, out_dir: Path) -> dict[str, Path]:
    """Write the report files into `out_dir` (created); returns {kind: path}.

    Kinds: json, markdown, html, junit, and `plot:<name>` per SVG in `plots/`. report.json goes
    first: if a renderer fails, the numbers are already safe and `difftest report DIR` can retry
    the rendering. SVGs of an earlier rendering that this run no longer draws are removed. A file
    that cannot be written (disk full, a folder in its place) is an OutputError naming it (exit 2).
    """
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md"}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # each file's own errors are atomic_write_text's (OutputError)
        raise output_error(paths["json"], exc) from exc
    paths |= {"html": out_dir / "report.html", "junit": out_dir / "junit.xml"}
    atomic_write_text(paths["json"], run_to_json(run))
    plots = run_plots(run)
    atomic_write_text(paths["markdown"], render_markdown(run))
    atomic_write_text(paths["html"], render_html(run, plots))
    atomic_write_text(paths["junit"], render_junit(run))
    plot_dir = out_dir / PLOTS_DIR
    wanted = {f"{p.slug}.svg" for p in plots}
    if plot_dir.is_dir():
        for old in plot_dir.glob("*.svg"):
            if old.name not in wanted:
                try:
                    old.unlink()
                except OSError as exc:
                    raise output_error(old, exc) from exc
    for p in plots:
        paths[f"plot:{p.slug}"] = atomic_write_text(plot_dir / f"{p.slug}.svg", p.svg + "\n")
    return paths
