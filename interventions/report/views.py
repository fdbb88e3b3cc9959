"""Report sections per kind of run: one table, `VIEWS`, from a run's kind to the function that builds its sections.
Grids (trace, patch, lens, knockout) are in `interventions.report.grids`; every other kind is here. Each kind also
gets the run's PNGs and files (`files_sections`), so a page exists for any folder `lesion run` wrote.
"""

from __future__ import annotations

import json
from typing import Callable

from interventions.report.grids import grid_sections, pointer
from interventions.report.run import Run, png_of

#: Largest JSON file shown whole in the page (bigger ones are named, and stay on disk).
MAX_INLINE_JSON = 400_000


def table(title: str, file: str, columns: list[str], rows: list[list]) -> dict:
    """A table section. Each cell is a value, or ``(value, parts)``: a value read from `file` at JSON pointer
    `parts` (what the page's test checks against the file)."""
    shown = [[c[0] if isinstance(c, tuple) else c for c in row] for row in rows]
    sources = [[pointer(file, *c[1]) if isinstance(c, tuple) else None for c in row] for row in rows]
    return {"type": "table", "title": title, "columns": columns, "rows": shown, "sources": sources}


def edit_sections(run: Run) -> list[dict]:
    if "curves.json" in run.json:
        return curve_sections(run)
    if "metrics.json" in run.json:
        return edit_metric_sections(run)
    return scalar_sections(run, "report.json")


def edit_metric_sections(run: Run) -> list[dict]:
    m = run.json["metrics.json"]
    keys = [k for k in m.get("after", {}) if k != "per_request"]
    rows = [[k, (m["before"][k], ("before", k)), (m["after"][k], ("after", k))] for k in keys]
    sections = [table(f"{m.get('method', 'edit')} at layers {m.get('layers')}: teacher-forced metrics",
                      "metrics.json", ["metric", "unedited", "edited"], rows)]
    requests = []
    for j, (b, a) in enumerate(zip(m["before"].get("per_request", []), m["after"].get("per_request", []))):
        requests.append([b.get("subject", j)] + [(side[k], (name, "per_request", j, k))
                                                 for name, side in (("before", b), ("after", a))
                                                 for k in ("p_new", "p_true") if k in side])
    if requests:
        sections.append(table("per request", "metrics.json",
                              ["subject", "p(new) before", "p(true) before", "p(new) after", "p(true) after"],
                              requests))
    return sections


def curve_sections(run: Run) -> list[dict]:
    """Sequential editing: each metric against the number of edits, hover per measurement."""
    c = run.json["curves.json"]
    rows = c["rows"]
    metrics = [k for k in rows[0] if k != "edits" and all(isinstance(r.get(k), (int, float, type(None))) for r in rows)]
    series = [{"name": k, "y": [r.get(k) for r in rows], "source": pointer("curves.json", "rows", "*", k)}
              for k in metrics]
    return [{"type": "curves", "id": "curves", "title": f"sequential {c.get('method', '')}: metrics against edits",
             "x": [r["edits"] for r in rows], "xname": "edits", "x_source": pointer("curves.json", "rows", "*", "edits"),
             "series": series}]


def erase_sections(run: Run) -> list[dict]:
    r = run.json["report.json"]
    before = r.get("erased_rate_before") or {}
    rates = [[k, (before[k], ("erased_rate_before", k)) if k in before else None, (v, ("erased_rate", k))]
             for k, v in r["erased_rate"].items()]
    sections = [table(f"{r.get('method')} erasure: the erased concept's rate", "report.json",
                      ["prompt set", "before", "after"], rates)]
    kept = [[w, (v["before"], ("kept", w, "before")), (v["after"], ("kept", w, "after")), v["prompts"]]
            for w, v in r.get("kept", {}).items()]
    if kept:
        sections.append(table("other concepts kept", "report.json", ["concept", "before", "after", "prompts"], kept))
    gallery = gallery_section(run)
    return sections + judged_sections(run) + ([gallery] if gallery else [])


def gallery_section(run: Run) -> dict | None:
    """Before/after images with each image's judged label, filterable by prompt set (images.json describes
    each image of images.safetensors)."""
    path = run.folder / "images.json"
    if not path.is_file():
        return None
    described = json.loads(path.read_text(encoding="utf-8"))
    tensors = run.tensors("images.safetensors")
    items = []
    for j, item in enumerate(described["images"]):
        pixels = tensors[item["phase"]][item["index"]]
        items.append({**item, "src": png_of(pixels), "source": pointer("images.json", "images", j, "label")})
    return {"type": "gallery", "id": "gallery", "title": "images and their judged labels",
            "sets": sorted({i["set"] for i in items}), "items": items}


def steer_sections(run: Run) -> list[dict]:
    r = run.json.get("results.json", {})
    metrics = r.get("metrics", [])
    rows = [[(row["coef"], ("table", j, "coef"))] + [(row.get(k), ("table", j, k)) for k in metrics]
            for j, row in enumerate(r.get("table", []))]
    sections = [table("steering: metrics per coefficient", "results.json", ["coefficient", *metrics], rows)]
    coefs = sorted({g["coef"] for g in run.generations})
    by_key: dict[tuple, dict] = {}
    for g in run.generations:
        by_key.setdefault((g["prompt"], g.get("sample", 0)), {})[g["coef"]] = g["text"]
    side = [[p, s] + [texts.get(c, "") for c in coefs] for (p, s), texts in by_key.items()]
    sections.append({"type": "table", "title": "generations side by side, per coefficient",
                     "columns": ["prompt", "sample"] + [f"×{c:g}" for c in coefs], "rows": side, "wrap": True,
                     "sources": [[None] * len(row) for row in side]})
    return sections


def probe_sections(run: Run) -> list[dict]:
    r = run.json["report.json"]
    return [{"type": "grid", "id": "probe", "title": "probe accuracy (held-out groups)", "grid": "accuracy",
             "prompt": 0, "source": pointer("report.json", "accuracy"), "z": r["accuracy"],
             "x": [str(layer) for layer in r["layers"]], "y": r["positions"], "positions": r["positions"],
             "axis": "layer", "site": "probe", "metric": "accuracy", "answer": None, "clean": None,
             "corrupted": None, "windows": None,
             "extra": {"control accuracy": r.get("control_accuracy"), "selectivity": r.get("selectivity")}},
            table("best probe", "report.json", ["field", "value"],
                  [[k, (v, ("best", k))] for k, v in r["best"].items()] +
                  [["majority baseline", (r["majority_baseline"], ("majority_baseline",))]])]


def daam_sections(run: Run) -> list[dict]:
    r = run.json["report.json"]
    rows = [[p["prompt"], w, (v, ("prompts", i, "iou", w)), (p["iou_outline"][w], ("prompts", i, "iou_outline", w))]
            for i, p in enumerate(r["prompts"]) for w, v in p["iou"].items()]
    return [table(f"cross-attention maps against the truth ({r.get('truth', '')})", "report.json",
                  ["prompt", "word", "IoU (mask)", "IoU (outline)"], rows)]


def decompose_sections(run: Run) -> list[dict]:
    r = run.json["result.json"]
    sections = []
    for q, v in r["questions"].items():
        sections.append({"type": "grid", "id": f"heads-{q}", "title": f"{q}: accuracy with one head mean-ablated "
                         f"(clean {v['accuracy']:.3f})", "grid": q, "prompt": 0,
                         "source": pointer("result.json", "questions", q, "head_ablation"), "z": v["head_ablation"],
                         "x": [str(layer) for layer in range(r["layers"])],
                         "y": [f"H{h}" for h in range(r["heads_per_layer"])], "positions": None, "axis": "layer",
                         "site": "attention head", "metric": "accuracy", "answer": None, "clean": v["accuracy"],
                         "corrupted": None, "windows": None})
    questions = list(r["questions"])
    rows = [[named] + [(r["named_ablation"][named][q], ("named_ablation", named, q)) for q in questions]
            for named in r.get("named_ablation", {})]
    sections.append(table("named heads ablated together: accuracy per question", "result.json",
                          ["heads named for", *questions], rows))
    return sections


def judged_sections(run: Run, file: str = "report.json") -> list[dict]:
    """A testbed's judged images per prompt before and after an edit: the share of images showing each word."""
    r = run.json.get(file) or {}
    before, after = r.get("before"), r.get("after")
    if not isinstance(before, dict) or not isinstance(after, dict):
        return []
    rows = [[prompt, word, (v, ("before", prompt, word)), (after[prompt][word], ("after", prompt, word))]
            for prompt, shown in before.items() if isinstance(shown, dict)
            for word, v in shown.items() if isinstance(v, (int, float)) and word in after.get(prompt, {})]
    return [table("share of images showing each word, before and after the edit", file,
                  ["prompt", "word", "before", "after"], rows)] if rows else []


def apply_sections(run: Run) -> list[dict]:
    return judged_sections(run) + scalar_sections(run, "report.json")


def scalar_sections(run: Run, file: str) -> list[dict]:
    """The top-level numbers and strings of a JSON file, as a table (any kind without a view of its own)."""
    data = run.json.get(file)
    if not isinstance(data, dict):
        return []
    rows = [[k, (v, (k,))] for k, v in data.items() if isinstance(v, (int, float, str, bool)) or v is None]
    return [table(f"{file}: top-level values", file, ["field", "value"], rows)] if rows else []


def files_sections(run: Run) -> list[dict]:
    """Every PNG the run drew, and every JSON file, folded (those over `MAX_INLINE_JSON` bytes are only named)."""
    sections = [{"type": "png", "title": name, "src": run.png_uri(name)} for name in run.pngs]
    for name in run.json:
        size = (run.folder / name).stat().st_size
        text = (run.folder / name).read_text(encoding="utf-8") if size <= MAX_INLINE_JSON else \
            f"{size:,} bytes: open {name} in the run folder"
        sections.append({"type": "json", "title": name, "text": text})
    return sections


def features_sections(run: Run) -> list[dict]:
    """Per concept the best feature, feature union, neuron and probe (held-out F1); then each described
    feature's and neuron's max-activating examples."""
    r = run.json["report.json"]
    rows = [[c["concept"], c["examples"]] + [(c[k][f], ("concepts", j, k, f)) for k, f in
                                              (("feature", "unit"), ("feature", "f1"), ("features", "f1"),
                                               ("neuron", "unit"), ("neuron", "f1"), ("probe", "f1")) if k in c]
            for j, c in enumerate(r.get("concepts", []))]
    sections = [table("concepts: held-out F1 of the best feature, union of features, neuron and linear probe",
                      "report.json", ["concept", "examples", "feature", "F1", "union F1", "neuron", "F1", "probe F1"],
                      rows)] if rows else []
    for group in ("features", "neurons"):
        units = [[(u["unit"], (group, j, "unit")), (u["active_share"], (group, j, "active_share"))] +
                 [" | ".join(e["text"] for e in u["examples"][:3])] for j, u in enumerate(r.get(group, []))]
        if units:
            sections.append({**table(f"{group}: max-activating examples (⟦token⟧ marked)", "report.json",
                                     ["unit", "active share", "top examples"], units), "wrap": True})
    return sections + scalar_sections(run, "report.json")


#: kind -> the sections its report shows above the run's files.
VIEWS: dict[str, Callable[[Run], list[dict]]] = {
    "trace": grid_sections, "patch": grid_sections, "lens": grid_sections, "knockout": grid_sections,
    "decompose": decompose_sections, "edit": edit_sections, "erase": erase_sections, "steer": steer_sections,
    "probe": probe_sections, "daam": daam_sections, "features": features_sections,
    "apply": apply_sections,
}


def sections_of(run: Run) -> list[dict]:
    return VIEWS.get(run.kind, lambda r: [])(run) + files_sections(run)
