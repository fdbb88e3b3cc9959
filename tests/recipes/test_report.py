"""`lesion report`: pages for every kind of run, checked value by value against the run's files, and a real
browser (Debian's headless Chromium, driven by Playwright) hovering, clicking and screenshotting them.

The golden cases (`support.golden.CASES`, run by tests/test_behaviour.py) are checked there; the kinds they do
not cover (CLIP trace, lens and decomposition, the VLM's tower trace, sequential editing, features, a grid of
2,048 feature rows by attribution, apply on the diffusion testbed) run here at small settings. Without Chromium or Playwright the browser tests fail with what to install; never a skip.
"""

from __future__ import annotations

import json

import pytest

from support import browser
from support.golden import ROOT, run_small
from support.report_check import page_differences, resolve

pytestmark = pytest.mark.real_model

#: Recipes beyond the golden cases, one per kind and model family they add, at small settings.
REPORT_CASES: dict[str, tuple[str, dict]] = {
    "trace_red_clip": ("recipes/contrastive/trace_red_clip.yaml", {"prompts": "first:1", "sites": ["hidden", "attention"]}),
    "lens_colour_clip": ("recipes/contrastive/lens_colour_clip.yaml", {"prompts": "first:1"}),
    "decompose_heads": ("recipes/contrastive/decompose_heads.yaml",
                        {"images": ["scenes:random:64@1"], "questions": ["scenes:colour", "scenes:shape"]}),
    "trace_flag_tower": ("recipes/vision-language/trace_flag_tower.yaml",
                         {"prompts": "first:1", "samples": 1, "layers": [0, 20], "vision_sites": ["attention"]}),
    "sequential_rome": ("recipes/edit/sequential_smollm2_rome.yaml",
                        {"requests_from": {"limit": 2}, "mom2_tokens": 2000,
                         "sequential": {"eval_every": 1, "eval_at": [], "sample": 2, "fluency_prompts": 1},
                         "hyperparameters": {"v_steps": 4, "context_templates": []}}),
    "features_scenes": ("recipes/features/features_scenes.yaml", {"examples": "first:6", "describe": 2}),
    "patch_colour_features": ("recipes/features/patch_colour_features.yaml", {"prompts": "first:2"}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each REPORT_CASES run, the Eiffel trace exactly and by attribution (for the comparison), the red
    erasure and a `lesion apply` of the shipped red erasure."""
    from recipes.cli import main
    from support.golden import CASES

    work = tmp_path_factory.mktemp("report_runs")
    done = {case: run_small(case, work, REPORT_CASES) for case in REPORT_CASES}
    for case in ("trace_eiffel", "trace_eiffel_attribution", "erase_red"):
        done[case] = run_small(case, work, CASES)
    done["apply_red"] = work / "apply_red"                      # `lesion apply` on the text-to-image testbed
    assert main(["--threads", "1", "apply", "--model", "shapes-diffusion", "--delta",
                 str(ROOT / "checkpoints" / "erase_red_uce_shapes.safetensors"), "--prompt", "a red circle", "--out",
                 str(done["apply_red"])]) == 0
    return done


@pytest.fixture(scope="module")
def chromium():
    why = browser.missing()
    if why:
        pytest.fail(why)
    with browser.chromium() as b:
        yield b


@pytest.mark.parametrize("case", sorted(REPORT_CASES) + ["apply_red"])
def test_every_kind_renders_and_the_page_shows_the_files_values(runs, case):
    from interventions.report import write_report

    page = write_report(runs[case])
    found, checked = page_differences(runs[case], page)
    assert found == [] and checked >= 2


def test_the_comparison_gives_lesion_compares_r_and_both_grids(runs, tmp_path):
    from interventions.engine.compare import compare_saved
    from interventions.report import read_data, write_report

    exact, approx = runs["trace_eiffel"], runs["trace_eiffel_attribution"]
    page = write_report(exact, tmp_path / "compare.html", compare=approx)
    doc = read_data(page.read_text(encoding="utf-8"))
    notes = {s["grid"]: s["stats"] for s in doc["sections"] if s["type"] == "note" and "stats" in s}
    expected = compare_saved(exact, approx)
    assert set(notes) == set(expected)
    for grid, stats in notes.items():
        assert stats["r"] == pytest.approx(expected[grid]["pearson"], abs=1e-9)
        assert 0 <= stats["top10_overlap"] <= 1
    found, checked = page_differences(exact, page, other=approx)
    assert found == [] and checked >= 6


def test_a_report_keeps_the_run_folder_replaceable(runs, tmp_path):
    import shutil

    from interventions.core.atomic import replaceable
    from interventions.report import write_report

    folder = tmp_path / "run"
    shutil.copytree(runs["lens_colour_clip"], folder)
    assert replaceable(folder)
    write_report(folder)
    assert (folder / "report.html").is_file() and replaceable(folder)


def test_a_result_in_a_notebook_shows_the_same_page_inline(runs):
    import html
    import re

    from interventions.report import RunReport, read_data, render

    shown = RunReport(runs["trace_eiffel"])._repr_html_()
    assert shown.startswith("<iframe srcdoc=")
    inner = html.unescape(re.search(r'srcdoc="(.*?)" style', shown, re.S).group(1))
    assert read_data(inner) == read_data(render(runs["trace_eiffel"]))


def test_a_result_object_shows_its_grids_inline(tiny_llama):
    import html
    import math
    import re

    from interventions import parse_spec, run
    from interventions.report import read_data

    model, tokenizer = tiny_llama
    prompts = [{"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower"},
               {"prompt": "The Colosseum is in the city of", "subject": "Colosseum"}]
    result = run(parse_spec({"kind": "trace", "model": "tiny", "prompts": prompts, "samples": 2}), model, tokenizer)
    shown = result._repr_html_()
    doc = read_data(html.unescape(re.search(r'srcdoc="(.*?)" style', shown, re.S).group(1)))
    grids = {(s["prompt"], s["grid"]): s["z"] for s in doc["sections"] if s["type"] == "grid"}
    assert set(grids) == {(i, g) for i in range(2) for g in result.grids}
    for (i, name), z in grids.items():
        expected = result.grids[name].nested()[i]
        assert [[None if math.isnan(v) else v for v in row] for row in expected] == z


def test_an_index_links_every_run_in_a_folder(runs, tmp_path, capsys):
    import shutil

    from recipes.cli import main

    for case in ("lens_colour_clip", "decompose_heads"):
        shutil.copytree(runs[case], tmp_path / case)
    assert main(["report", str(tmp_path)]) == 0
    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert 'href="lens_colour_clip/report.html"' in index and 'href="decompose_heads/report.html"' in index
    assert (tmp_path / "decompose_heads" / "report.html").is_file()


# ------------------------------------------------------------------------------------------- in the browser
def test_a_trace_reports_hover_value_pin_and_screenshot(runs, chromium):
    from interventions.report import write_report

    folder = runs["trace_eiffel"]
    page, _ = browser.open_report(chromium, write_report(folder))
    result = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    tokens = len(result["prompts"][0]["columns"])
    for grid, column, row in (("hidden", 3, 1), ("mlp", tokens - 1, 2), ("attention", 0, 0)):
        text = browser.hover_cell(page, f"grid-0-{grid}", column, row)
        expected = result["grids"][grid]["values"][0][row][column]
        assert browser.number_after(text, "value") == pytest.approx(expected, rel=1e-5, abs=1e-9)
        assert f"layer {result['grids'][grid]['layers'][row]}" in text
        assert browser.number_after(text, "clean p") == pytest.approx(result["prompts"][0]["clean_prob"], rel=1e-5)
    section = page.locator("#grid-0-hidden")
    assert section.locator(".pinned .pin-row").count() == 0
    browser.click_cell(page, "grid-0-hidden", 3, 1)
    section.locator(".pinned .pin-row .scatterlayer .trace").first.wait_for(timeout=5_000)
    assert section.locator(".pinned .pin-row .scatterlayer .trace").count() == 1
    assert section.locator(".pinned .pin-col .scatterlayer .trace").count() == 1
    section.locator(".yaxislayer-above .ytick text").nth(2).click()       # a token's label: its row alone
    section.locator(".pinned .pin-row .scatterlayer .trace").nth(1).wait_for(timeout=5_000)
    assert section.locator(".pinned .pin-col .scatterlayer .trace").count() == 1
    section.locator(".xaxislayer-above .xtick text").nth(1).click()       # a layer's label: its column alone
    section.locator(".pinned .pin-col .scatterlayer .trace").nth(1).wait_for(timeout=5_000)
    legend = section.locator(".pinned .pin-col .legendtext").all_text_contents()
    assert legend == [f"layer {result['grids']['hidden']['layers'][1]}"] * 2
    assert browser.not_blank(page.screenshot())


def test_a_vlm_trace_moves_its_image_overlay_to_the_hovered_layer(runs, chromium):
    from interventions.report import write_report

    folder = runs["trace_flag_tower"]
    page, _ = browser.open_report(chromium, write_report(folder))
    result = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    name = "vision_attention"
    layers = result["grids"][name]["layers"]
    overlay = page.locator(f"#grid-0-{name} .overlay")
    sources = overlay.evaluate("gd => gd.layout.images.map(i => i.source.slice(0, 22))")
    assert sources == ["data:image/png;base64,"]                  # the flag itself, under the patch cells
    browser.hover_cell(page, f"grid-0-{name}", 2, len(layers) - 1)
    assert f"layer {layers[-1]}" in overlay.locator(".gtitle").text_content()
    assert browser.not_blank(page.locator(f"#grid-0-{name}").screenshot())


def test_an_erase_report_shows_each_image_with_its_judged_label(runs, chromium):
    from interventions.report import write_report

    folder = runs["erase_red"]
    page, _ = browser.open_report(chromium, write_report(folder))
    described = json.loads((folder / "images.json").read_text(encoding="utf-8"))["images"]
    shots = page.locator(".gallery .shot")
    assert shots.count() == len(described)
    for index in (0, len(described) // 2, len(described) - 1):
        shot = page.locator(f'.gallery .shot[data-index="{index}"]')
        assert shot.locator(".label").text_content() == (described[index]["label"] or "(nothing judged)")
        assert shot.locator("img").evaluate("img => img.naturalWidth") > 0
    page.select_option(".gallery-section select", "heldout")
    visible = page.locator(".gallery figure:visible")
    assert 0 < visible.count() < page.locator(".gallery figure").count()
    assert all(f.get_attribute("data-set") == "heldout" for f in visible.all())
    assert browser.not_blank(page.screenshot())


def test_a_sequential_edit_report_shows_each_measurement_on_hover(runs, chromium):
    from interventions.report import write_report

    folder = runs["sequential_rome"]
    page, _ = browser.open_report(chromium, write_report(folder))
    rows = resolve(folder, "curves.json#/rows")
    for metric in ("efficacy", "heldout_accuracy"):
        text = browser.curve_point(page, metric, len(rows) - 1)
        assert browser.number_after(text, metric) == pytest.approx(rows[-1][metric], rel=1e-5, abs=1e-9)
        assert browser.number_after(text, "edits") == rows[-1]["edits"]
    assert browser.not_blank(page.screenshot())


def test_a_grid_of_2048_feature_rows_draws_with_its_labels_thinned(runs, chromium):
    from interventions.report import write_report

    folder = runs["patch_colour_features"]
    page, _ = browser.open_report(chromium, write_report(folder))     # drawn (it once took minutes: 53,000 px)
    result = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    grid = result["grids"]["features"]
    assert len(grid["features"]) == 2048
    section = page.locator("#grid-0-features")
    assert section.locator(".xaxislayer-above .xtick text").count() <= 40
    assert section.locator(".main-svg").first.evaluate("svg => svg.getBoundingClientRect().width") <= 1200
    text = browser.hover_cell(page, "grid-0-features", 1, 700)
    assert browser.number_after(text, "value") == pytest.approx(grid["values"][0][700][1], rel=1e-5, abs=1e-9)
