"""One self-contained HTML page per run (and an index page over many): plotly.js, the page's script and style
inlined, the run's data as one JSON document in the page. Opened from disk it needs no network and no server.

The drawing is plotly.js (the copy inside the `plotly` Python package, so nothing is fetched); `report.js` turns
the document's sections into heatmaps, curves, tables and image galleries, and adds the interactions (hover
details, pinned row and column plots, the image-token overlay, the prompt-set filter).
"""

from __future__ import annotations

import html
import json
from functools import lru_cache
from pathlib import Path

from interventions.core.atomic import finite_json

HERE = Path(__file__).resolve().parent
#: The id of the script element holding the page's data (what the tests read back).
DATA_ID = "lesion-data"


@lru_cache(maxsize=1)
def plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def page_html(doc: dict) -> str:
    """The HTML of one report: `doc` is ``{"title", "kind", "summary": [[k, v]], "sections": [...]}``."""
    data = json.dumps(finite_json(doc), ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    title = html.escape(doc["title"])
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{title}</title>",
        f"<style>{(HERE / 'report.css').read_text(encoding='utf-8')}</style>",
        f"<script>{plotly_js()}</script>", "</head><body>",
        f'<script type="application/json" id="{DATA_ID}">{data}</script>', '<main id="report"></main>',
        f"<script>{(HERE / 'report.js').read_text(encoding='utf-8')}</script>", "</body></html>"])


def index_page(title: str, entries: list[dict]) -> str:
    """An index linking each run's report: entries ``{"href", "name", "kind", "model", "summary"}``."""
    rows = "".join(
        f'<tr><td><a href="{html.escape(e["href"])}">{html.escape(e["name"])}</a></td>'
        f'<td>{html.escape(e["kind"])}</td><td>{html.escape(str(e.get("model") or ""))}</td>'
        f'<td>{html.escape(e.get("summary") or "")}</td></tr>' for e in entries)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{(HERE / 'report.css').read_text(encoding='utf-8')}</style>"
            f"</head><body><main><h1>{html.escape(title)}</h1><table class=\"runs\"><thead><tr><th>run</th>"
            f"<th>kind</th><th>model</th><th>summary</th></tr></thead><tbody>{rows}</tbody></table></main>"
            "</body></html>")


def read_data(text: str) -> dict:
    """The JSON document a report page holds (the inverse of `page_html`'s embedding)."""
    start = text.index(f'id="{DATA_ID}">') + len(f'id="{DATA_ID}">')
    return json.loads(text[start:text.index("</script>", start)].replace("<\\/", "</"))
