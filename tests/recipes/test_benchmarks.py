"""The sweep benchmark commands on a tiny model: they check Lesion against their reference
loops themselves (exit 1 on disagreement), and report every measure. No timing is asserted."""

from __future__ import annotations

import json

import pytest

from recipes.cli import main
from support.models import make_model


@pytest.fixture()
def folder(tmp_path, tokenizer):
    make_model("llama", len(tokenizer)).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path


def test_bench_trace_agrees_with_its_reference(folder):
    assert main(["bench-trace", "--model", str(folder / "tiny"), "--samples", "3", "--memory", "64MB",
                 "--json", str(folder / "t.json")]) == 0
    report = json.loads((folder / "t.json").read_text())
    assert report["max_abs_diff"] <= 1e-4 and report["cells"] == 3 * 4 * 9     # sites × layers × words
    assert report["memory_budget"] == 64_000_000 and report["lesion_peak_bytes"] is not None
    assert {"speedup", "attribution_speedup", "lesion_over_plain_forward",
            "attribution_correlation_hidden"} <= set(report)
    for rule in ("relp", "qk-fix", "atp-star"):
        row = report["attribution_rules"][rule]
        assert row["s"] > 0 and all(-1 <= row[f"r_{g}"] <= 1 and 0 <= row[f"top10_{g}"] <= 1
                                    for g in ("hidden", "mlp", "attention"))


def test_attribution_rules_study_scores_each_rule_against_exact(folder, monkeypatch, capsys):
    """The study's r and top-10 overlap for a rule equal Pearson r and the overlap computed here from an
    exact and an attribution run of the same spec; its last line is one JSON object of the figures."""
    from interventions import parse_spec, run
    from interventions.core.metrics import pearson, top_overlap
    from interventions.models.loading import load_model
    from recipes.studies import attribution_rules

    tiny = str(folder / "tiny")
    monkeypatch.setattr(attribution_rules, "CASES", {
        "tiny": (tiny, {"prompt": "the eiffel tower is located in the city of", "subject": "eiffel tower"})})
    capsys.readouterr()
    assert main(["attribution-rules", "--out", str(folder / "rules"), "--cases", "tiny", "--samples", "2"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((folder / "rules" / "report.json").read_text())
    assert set(report["cases"]["tiny"]["rules"]) == {"gradient", "relp", "qk-fix", "atp-star", "gradient-steps4",
                                                     "relp-steps4"}
    model, tokenizer = load_model(tiny)
    spec = {"kind": "trace", "model": tiny, "prompts": [attribution_rules.CASES["tiny"][1]], "window": 10,
            "sites": ["hidden", "mlp", "attention"], "samples": 2, "seed": 0}
    exact = run(parse_spec(spec), model, tokenizer)
    relp = run(parse_spec({**spec, "method": "attribution", "rule": "relp"}), model, tokenizer)
    for grid in ("hidden", "mlp", "attention"):
        e, a = exact.indirect_effect(grid), relp.indirect_effect(grid)
        assert figures[f"tiny_relp_r_{grid}"] == pytest.approx(pearson(e, a), abs=1e-4)
        assert figures[f"tiny_relp_top10_{grid}"] == pytest.approx(top_overlap(e, a, 10), abs=1e-4)
    with pytest.raises(SystemExit) as bad:
        main(["attribution-rules", "--out", str(folder / "other"), "--cases", "nope"])
    assert bad.value.code == 2 and "--cases" in capsys.readouterr().err


def test_bench_trace_on_a_vlm_agrees_with_its_reference(folder, capsys):
    """On a LLaVA folder: cells over every position (each image token) and the aggregated image cell,
    against a reference loop that runs the whole LLaVA forward (pixels in) per cell; the last line
    printed is the report as one JSON object."""
    from interventions.modalities.vision_language.llava import VisionSpec, assemble_llava
    from support.models import make_tokenizer

    vlm, tok = assemble_llava(make_model("llama", len(make_tokenizer())), make_tokenizer(),
                              VisionSpec(hidden_size=24, intermediate_size=48))
    vlm.save_pretrained(folder / "llava")
    tok.save_pretrained(folder / "llava")
    capsys.readouterr()
    assert main(["bench-trace", "--model", str(folder / "llava"), "--samples", "2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    columns = report["tokens"] + 1                      # every position, and the aggregated image cell
    assert report["image_tokens"] == 4 and report["cells"] == 3 * 4 * columns
    assert report["max_abs_diff"] <= 1e-4
    assert {"speedup", "attribution_speedup", "attribution_r", "lesion_over_plain_forward"} <= set(report)


def test_bench_patch_agrees_with_its_reference(folder):
    assert main(["bench-patch", "--model", str(folder / "tiny"), "--prompts", "6", "--reference-prompts", "3",
                 "--json", str(folder / "p.json")]) == 0
    report = json.loads((folder / "p.json").read_text())
    assert report["prompts"] == 6 and report["reference_prompts_timed"] == 3
    assert 0 < report["reference_cells_timed"] < report["cells"]
    assert report["max_abs_diff"] <= 1e-3
    assert {"speedup", "attribution_speedup", "attribution_correlation",
            "reference_s_scaled_to_all_cells"} <= set(report)


def test_bench_erase_times_every_method_and_ends_with_json(capsys):
    """`lesion bench-erase` on the shipped testbed: one row per method, the last line one JSON object."""
    assert main(["bench-erase", "--methods", "uce", "rece", "diff-quickfix", "--images", "2", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert set(report["methods"]) == {"uce", "rece", "diff-quickfix"}
    assert report["methods"]["diff-quickfix"]["projections"] == 1 and report["methods"]["uce"]["projections"] == 14
    assert all(r["edit_seconds_median"] > 0 and r["edited_images_per_s"] > 0 for r in report["methods"].values())
    assert {"uce_edit_s", "rece_ratio", "diff_quickfix_edit_s"} <= set(report)


def test_bench_dictionary_ends_with_its_figures_as_json(folder, capsys):
    assert main(["bench-dictionary", "--model", str(folder / "tiny"), "--layer", "1", "--tokens", "512",
                 "--features", "64", "--k", "4", "--batch", "3", "--repeats", "1"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["d_sae"] == 64 and figures["train_tokens"] == 512 and figures["overhead"] > 0
    assert figures["threads"] >= 1 and figures["forward_tokens"] > 0

