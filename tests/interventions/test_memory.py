"""Memory budgets: sizes parse, too-small budgets are refused, a budgeted sweep gives the
unbudgeted result, and its measured peak stays within the budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from interventions import SpecError, compile_spec, parse_spec, run_plan
from interventions.core.units import parse_bytes
from recipes.cli import main
from support.models import make_model

PROBE = Path(__file__).parents[1] / "support" / "memory_probe.py"
TOL = 1e-5
PROMPTS = [{"prompt": "the eiffel tower is located in the city of", "subject": "eiffel tower"},
           {"prompt": "the colosseum is in the city of", "subject": "colosseum"},
           {"prompt": "big ben is in london", "subject": "big ben"}]


@pytest.mark.parametrize("text,expected", [("512MB", 512 * 10**6), ("2GiB", 2 * 2**30), ("1.5g", 15 * 10**8),
                                           ("1000", 1000), ("64 KiB", 65536), (4096, 4096)])
def test_sizes_parse(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "12 parsecs", "-5MB", "0", "1e9"])
def test_bad_sizes_name_the_field_and_the_allowed_forms(text):
    with pytest.raises(SpecError) as err:
        parse_bytes(text, "--memory")
    message = str(err.value)
    assert "--memory" in message and repr(text) in message and "512MB" in message


def test_a_budget_too_small_for_one_prompt_is_refused_before_running(tiny_llama):
    model, tokenizer = tiny_llama
    spec = parse_spec({"kind": "trace", "model": "tiny", "prompts": PROMPTS, "samples": 3})
    with pytest.raises(SpecError) as err:
        compile_spec(spec, model, tokenizer, memory=10_000)
    assert "memory" in str(err.value) and "at least" in str(err.value)


def tightest(spec, model, tokenizer):
    """The plan under the smallest budget (in steps of 10%) that compiles, and that budget."""
    budget, plan = 10**7, None
    while True:
        try:
            smaller = compile_spec(spec, model, tokenizer, memory=int(budget * 0.9))
        except SpecError:
            return plan, budget
        plan, budget = smaller, int(budget * 0.9)


@pytest.mark.parametrize("kind", ["trace", "patch"])
def test_budgeted_sweep_equals_the_unbudgeted_one(tiny, kind):
    """A budget splits the prompts into blocks and the rows into more chunks; nothing else changes."""
    family, model, tokenizer = tiny
    if kind == "trace":
        spec = parse_spec({"kind": "trace", "model": "tiny", "prompts": PROMPTS, "samples": 3, "window": 3,
                           "seed": 2})
    else:
        spec = parse_spec({"kind": "patch", "model": "tiny", "metric": "kl", "sites": ["block_output", "mlp_key"],
                           "prompts": [{"base": "big ben is in london", "source": "the colosseum is in rome"},
                                       {"base": "the eiffel tower is in paris", "source": "the statue liberty "
                                        "is in london"}]})
    free = compile_spec(spec, model, tokenizer)
    bound, budget = tightest(spec, model, tokenizer)
    assert len(free.blocks) == 1 and len(bound.chunks) > len(free.chunks)
    assert len(bound.blocks) > 1 or kind == "patch"     # two 1-variant prompts hold less than one row needs
    a, b = run_plan(free), run_plan(bound)
    assert b.meta["memory_budget"] == budget and b.meta["prompt_blocks"] == len(bound.blocks)
    for name, grid in a.grids.items():
        assert torch.allclose(grid.values, b.grids[name].values, atol=TOL, equal_nan=True)
    assert [p["clean_prob"] for p in a.prompts] == pytest.approx([p["clean_prob"] for p in b.prompts], abs=TOL)


#: glibc's malloc raises its mmap and trim thresholds as large blocks are freed, so freed
#: tensors stay resident and the high-water mark swings by megabytes between runs (the
#: 576-token VLM sweep: 116 to 151 MB). Fixed thresholds return large blocks at once, so
#: the measured peak is what the sweep held (75 MB, within 1% run to run).
MALLOC_FIXED = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def probe(budget: int | None, *options: str) -> dict:
    args = [sys.executable, str(PROBE)] + ([str(budget)] if budget else []) + list(options)
    proc = subprocess.run(args, capture_output=True, text=True, check=True, env={**os.environ, **MALLOC_FIXED})
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure the peak")
def test_measured_peak_stays_within_the_budget():
    """In a fresh process, the sweep's resident-set peak (measured, not estimated) stays
    under the budget, while the same sweep without a budget needs far more."""
    budget = 8_000_000
    free, bound = probe(None), probe(budget)
    assert free["peak"] > 3 * budget
    assert bound["peak"] <= budget and bound["blocks"] > 1
    for name, values in free["grids"].items():
        assert torch.allclose(torch.tensor(values), torch.tensor(bound["grids"][name]), atol=TOL, equal_nan=True)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure the peak")
def test_a_576_image_token_vlm_trace_stays_within_the_budget():
    """LLaVA-1.5's shape (576 image tokens per prompt, 580 tokens in all): the VLM trace, on the same engine,
    holds a 125 MB budget (near the smallest it accepts) that it exceeds more than three times over
    without one (403 MB measured), with the same grids."""
    budget = 125_000_000
    free, bound = probe(None, "--vlm"), probe(budget, "--vlm")
    assert free["tokens"] == 580 and free["peak"] > 3 * budget
    assert bound["peak"] <= budget and bound["chunks"] > free["chunks"]
    for name, values in free["grids"].items():
        assert torch.allclose(torch.tensor(values), torch.tensor(bound["grids"][name]), atol=TOL, equal_nan=True)


def test_cli_memory_option_reports_the_measured_peak(tmp_path, tokenizer, capsys):
    make_model("llama", len(tokenizer)).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    spec = tmp_path / "trace.yaml"
    spec.write_text(json.dumps({"kind": "trace", "model": str(tmp_path / "tiny"), "prompts": PROMPTS,
                                "samples": 2}))
    assert main(["run", str(spec), "--out", str(tmp_path / "out"), "--memory", "4MB", "--quiet"]) == 0
    assert "peak memory beyond the weights" in capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "result.json").read_text())["meta"]
    assert meta["memory_budget"] == 4_000_000 and meta["memory_peak_bytes"] >= 0
    assert meta["memory_peak_measured_by"]
    assert main(["run", str(spec), "--out", str(tmp_path / "bad"), "--memory", "lots"]) == 2
    assert "--memory" in capsys.readouterr().err
