"""Interactive reports: one self-contained HTML page per run folder, an index over a folder of runs, and the
same view inline in Jupyter.

>>> from interventions.report import write_report, RunReport
>>> write_report("runs/eiffel")                    # runs/eiffel/report.html  # doctest: +SKIP
>>> RunReport("runs/eiffel")                       # in a notebook: the page, inline  # doctest: +SKIP

`lesion report RUN_DIR [--compare OTHER_RUN]` is the command; a folder of runs gets an index.html too.
"""

from __future__ import annotations

import html
from pathlib import Path

from interventions.core.atomic import atomic_write, refresh_marker
from interventions.core.errors import SpecError
from interventions.report.grids import compare_sections, grid_sections
from interventions.report.page import index_page, page_html, read_data
from interventions.report.run import Run, is_run
from interventions.report.views import sections_of

__all__ = ["RunReport", "build", "html_for_result", "read_data", "render", "write_index", "write_report"]

REPORT = "report.html"


def build(run: Run, compare: Run | None = None) -> dict:
    """The page's document: a header, the kind's sections, and (with `compare`) the grids of both runs."""
    summary = [["kind", run.kind]] + ([["modality", run.modality]] if run.modality else []) + [["folder", run.name]]
    if model_of(run):
        summary.insert(1, ["model", model_of(run)])
    sections = sections_of(run)
    if compare is not None:
        sections = compare_sections(run, compare) + sections
    return {"title": f"Lesion {run.kind}: {run.name}", "kind": run.kind, "summary": summary, "sections": sections,
            "compared_with": compare.name if compare else None}


#: What a run file that parses but is not shaped as Lesion writes it raises while its sections are built.
SHAPE_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError)


def model_of(run: Run) -> str | None:
    """The model a run was made on, as its result.json or spec.yaml names it."""
    return (run.json.get("result.json") or {}).get("model") or run.spec.get("model")


def render(folder: str | Path, compare: str | Path | None = None) -> str:
    """The page of a run folder; a folder whose files are not shaped as Lesion writes them is one `SpecError`."""
    return _render(Run.open(folder), _open_other(compare) if compare else None)


def _render(run: Run, other: Run | None) -> str:
    try:
        return page_html(build(run, other))
    except SpecError:
        raise
    except SHAPE_ERRORS as err:
        raise SpecError("RUN_DIR", str(run.folder), "a run folder whose files are as `lesion run` wrote them "
                        f"({type(err).__name__}: {str(err)[:80]})") from None


def _open_other(compare: str | Path) -> Run:
    try:
        return Run.open(compare)
    except SpecError as err:
        raise SpecError("--compare", str(compare), err.allowed) from None


def write_report(folder: str | Path, out: str | Path | None = None, compare: str | Path | None = None) -> Path:
    """Write the run's page (default ``FOLDER/report.html``); a run folder Lesion marked stays marked."""
    return _write(Run.open(folder), out, _open_other(compare) if compare else None)


def _write(run: Run, out: str | Path | None = None, other: Run | None = None) -> Path:
    target = Path(out) if out else run.folder / REPORT
    atomic_write(target, _render(run, other).encode("utf-8"))
    if target.parent == run.folder:
        refresh_marker(run.folder, target.name)
    return target


def write_index(folder: str | Path) -> tuple[Path, list[Path]]:
    """A report in every run folder directly under `folder` (or `folder` itself), and `folder/index.html`."""
    folder = Path(folder)
    runs = [p for p in sorted(folder.iterdir()) if is_run(p)] if folder.is_dir() else []
    if not runs:
        raise SpecError("RUN_DIR", str(folder), "a run folder, or a folder of run folders (each holding "
                        "result.json, report.json, metrics.json or curves.json)")
    written, entries = [], []
    for run_folder in runs:
        run = Run.open(run_folder)
        written.append(_write(run))
        entries.append({"href": f"{run_folder.name}/{REPORT}", "name": run_folder.name, "kind": run.kind,
                        "model": model_of(run), "summary": ", ".join(f for f in run.json)})
    index = folder / "index.html"
    atomic_write(index, index_page(f"Lesion runs in {folder.name}", entries).encode("utf-8"))
    return index, written


def html_for_result(result) -> str:
    """A grid `Result` (not yet saved) as the report's page, in an iframe for a notebook's output cell."""
    doc = {"title": f"Lesion {result.kind}", "kind": result.kind,
           "summary": [["kind", result.kind], ["model", result.model]],
           "sections": grid_sections(Run(Path("<in memory>"), result.kind, "", {"result.json": result.to_dict()}))}
    return _iframe(page_html(doc))


class RunReport:
    """A run folder's report, shown inline by Jupyter (`_repr_html_`, the same page as `lesion report`)."""

    def __init__(self, folder: str | Path, compare: str | Path | None = None):
        self.folder, self.compare = Path(folder), compare

    def _repr_html_(self) -> str:
        return _iframe(render(self.folder, self.compare))

    def save(self, out: str | Path | None = None) -> Path:
        return write_report(self.folder, out, self.compare)


def _iframe(text: str, height: int = 720) -> str:
    """The page isolated in an iframe, so its script and style meet nothing else in the notebook."""
    return (f'<iframe srcdoc="{html.escape(text, quote=True)}" style="width:100%;height:{height}px;border:0" '
            'sandbox="allow-scripts"></iframe>')
