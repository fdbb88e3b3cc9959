"""A real browser for the report tests: Debian's headless Chromium driven by Playwright (no browser download).

    python tests/support/browser.py --screenshots OUT TRACE_RUN VLM_TRACE_RUN ERASE_RUN   # the README's pictures
    python tests/support/browser.py --timing REPORT.html ...   # median seconds until every plot is drawn

Without the browser the tests fail (never skip) with what to install: `apt-get install chromium` and the test
extra (`pip install -e .[test]`, which brings playwright).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

#: Where Debian's package puts Chromium; LESION_CHROMIUM names another binary.
CHROMIUM = os.environ.get("LESION_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
#: Headless, no sandbox (tests run as root), and no background traffic (this machine has no network).
FLAGS = ["--headless", "--no-sandbox", "--disable-background-networking", "--disable-gpu",
         "--disable-component-update", "--no-first-run", "--disable-sync"]
INSTALL = ("the report's browser tests need Debian's Chromium and Playwright: run `apt-get install -y chromium` "
           "and `bash recipes/install.sh test` (it installs both)")


def missing() -> str | None:
    """Why the browser cannot start here (None: it can)."""
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM}; {INSTALL}"
    if importlib.util.find_spec("playwright") is None:
        return f"playwright is not installed; {INSTALL}"
    return None


@contextlib.contextmanager
def chromium():
    """A headless Chromium (a Playwright `Browser`)."""
    why = missing()
    if why:
        raise RuntimeError(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def open_report(browser, path: str | Path, width: int = 1400, height: int = 1000):
    """A page with the report at `path` opened from disk and drawn; ``(page, seconds to ready)``."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(Path(path).resolve().as_uri())
    page.wait_for_function("document.body.dataset.ready !== undefined", timeout=30_000)
    if page.evaluate("document.body.dataset.ready") != "1":
        raise AssertionError("the report failed to draw: " + page.inner_text("#report")[:300])
    seconds = page.evaluate("performance.now()") / 1000
    return page, seconds


def cell_point(page, section_id: str, column: int, row: int) -> tuple[float, float]:
    """The page coordinates of a heatmap cell: `column` is a token's index, `row` a layer's index."""
    return tuple(page.evaluate(
        """([id, c, l]) => {
             const gd = document.querySelector(`#${CSS.escape(id)} .heatmap`);
             const fl = gd._fullLayout, box = gd.getBoundingClientRect();
             return [box.left + fl._size.l + fl.xaxis.l2p(l), box.top + fl._size.t + fl.yaxis.l2p(c)];
           }""", [section_id, column, row]))


def hover_cell(page, section_id: str, column: int, row: int) -> str:
    """Hover a heatmap cell; the tooltip's text (plotly's hover label)."""
    page.locator(f"#{section_id}").scroll_into_view_if_needed()
    x, y = cell_point(page, section_id, column, row)
    page.mouse.move(x, y)
    label = page.locator(f"#{section_id} .hoverlayer .hovertext")
    label.first.wait_for(timeout=5_000)
    return label.first.text_content()


def click_cell(page, section_id: str, column: int, row: int) -> None:
    """Click a heatmap cell (which pins its row's and column's line plots)."""
    page.locator(f"#{section_id}").scroll_into_view_if_needed()
    page.mouse.click(*cell_point(page, section_id, column, row))


def curve_point(page, metric: str, index: int) -> str:
    """Hover the `index`-th point of a curve; the tooltip's text."""
    box = page.locator(f'.curve[data-metric="{metric}"]')
    box.scroll_into_view_if_needed()
    x, y = page.evaluate(
        """([metric, i]) => {
             const gd = document.querySelector(`.curve[data-metric="${metric}"]`);
             const fl = gd._fullLayout, box = gd.getBoundingClientRect(), d = gd.data[0];
             return [box.left + fl._size.l + fl.xaxis.l2p(d.x[i]), box.top + fl._size.t + fl.yaxis.l2p(d.y[i])];
           }""", [metric, index])
    page.mouse.move(x, y)
    label = box.locator(".hoverlayer .hovertext")
    label.first.wait_for(timeout=5_000)
    return label.first.text_content()


def number_after(text: str, word: str) -> float:
    """The number following `word` in a tooltip's text (e.g. "value 0.701547")."""
    found = re.search(rf"{word}\s+(-?[0-9.]+(?:e-?[0-9]+)?)", text)
    if not found:
        raise AssertionError(f"no {word!r} number in the tooltip {text!r}")
    return float(found.group(1))


def not_blank(png: bytes) -> bool:
    """A screenshot that holds more than one colour over a meaningful share of its pixels."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("L")
    counts = sorted(img.histogram(), reverse=True)
    return sum(counts[1:]) > 0.05 * sum(counts)


def readme_screenshots(trace: Path, vlm_trace: Path, erase: Path, out: Path) -> list[Path]:
    """The README's three pictures: a trace with a cell hovered and a row pinned, a VLM trace with an image-token
    cell hovered (the flag and its cells beside the grid), and the top of an erase report."""
    from interventions.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with chromium() as b:
        for folder, name, section in ((trace, "trace", "grid-0-hidden"), (vlm_trace, "vlm_trace", "grid-0-hidden"),
                                      (erase, "erase", None)):
            page, _ = open_report(b, write_report(folder), width=1280, height=900)
            if section:
                result = json.loads((Path(folder) / "result.json").read_text(encoding="utf-8"))
                record = result["prompts"][0]
                values = result["grids"]["hidden"]["values"][0][1]            # layer row 1: the subject's columns
                column = max(record.get("image_positions") or record["subject_positions"], key=lambda c: values[c])
                click_cell(page, section, column, 0)
                hover_cell(page, section, column, 1)
                page.locator(f"#{section}").screenshot(path=str(out / f"{name}.png"))
            else:
                page.screenshot(path=str(out / f"{name}.png"))
            shots.append(out / f"{name}.png")
            page.close()
    return shots


def load_seconds(reports: list[Path], repeats: int = 5) -> dict[str, float]:
    """The median time from navigation to every plot drawn (`document.body.dataset.ready`), per report."""
    times = {}
    with chromium() as b:
        for report in reports:
            seen = []
            for _ in range(repeats):
                page, seconds = open_report(b, report)
                seen.append(seconds)
                page.close()
            times[str(report)] = sorted(seen)[len(seen) // 2]
    return times


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    if sys.argv[1:2] == ["--screenshots"]:          # OUT_DIR TRACE_RUN VLM_TRACE_RUN ERASE_RUN
        for shot in readme_screenshots(*map(Path, sys.argv[3:6]), Path(sys.argv[2])):
            print("wrote", shot)
    elif sys.argv[1:2] == ["--timing"]:             # REPORT.html ...
        found = load_seconds([Path(p) for p in sys.argv[2:]])
        sizes = {p: Path(p).stat().st_size for p in found}
        print(json.dumps({"load_seconds": found, "bytes": sizes}))
