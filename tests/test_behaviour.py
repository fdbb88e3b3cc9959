"""Rule 4 of the layout: behaviour is unchanged. Each shipped recipe in `support.golden.CASES`, run at small
settings through the CLI, gives the outputs recorded in tests/golden/: JSON numbers and tensor fingerprints
(a delta's change u @ v included) equal to `TOLERANCE` (2e-4), which float rounding on another CPU stays far
inside. Each run's `lesion report` page must show exactly the values its files hold."""

from __future__ import annotations

import json

import pytest
import torch

from interventions.report import write_report
from support.golden import CASES, GOLDEN, differences, factor_products, run_case, tensor_print
from support.report_check import page_differences

pytestmark = pytest.mark.real_model


@pytest.mark.parametrize("case", sorted(CASES))
def test_recipe_outputs_are_unchanged(case, tmp_path):
    expected = json.loads((GOLDEN / f"{case}.json").read_text(encoding="utf-8"))
    got = json.loads(json.dumps(run_case(case, tmp_path)))     # the same JSON round trip as the record
    found = differences(expected, got)
    assert not found, f"{case}: {len(found)} difference(s), first: " + "; ".join(found[:5])
    page = write_report(tmp_path / case)                       # and its report shows exactly what it wrote
    shown, checked = page_differences(tmp_path / case, page)
    assert shown == [] and checked >= 1


def test_the_comparison_catches_a_change():
    base = {"a": [1.0, {"b": 0.5}], "t": "sha x"}
    assert differences(base, {"a": [1.0 + 1e-9, {"b": 0.5}], "t": "sha x"}) == []
    assert differences(base, {"a": [1.0, {"b": 0.5 + 1e-3}], "t": "sha x"}) == ["/a[1]/b: 0.501, expected 0.5"]
    assert differences(base, {"a": [1.0, {"b": 0.5}], "t": "sha y"}) == ["/t: 'sha y', expected 'sha x'"]
    assert differences(base, {"a": [1.0], "t": "sha x"}) == ["/a: length 1, expected 2"]


def test_tensor_fingerprints_ignore_rounding_and_catch_a_change():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(64, 48, generator=g)
    rounded = t * (1 + 1e-6 * torch.randn(t.shape, generator=g))      # what another CPU's sums give
    assert differences(tensor_print(t), tensor_print(rounded)) == []
    moved = t.clone()
    moved[17, 5] += 1e-3 * t.norm()                                     # one element, by 0.1% of the norm
    assert differences(tensor_print(t), tensor_print(moved)) != []
    assert tensor_print(torch.arange(4)) != tensor_print(torch.tensor([0, 1, 2, 4]))
    u, v = torch.randn(8, 2, generator=g), torch.randn(2, 5, generator=g)
    a = factor_products({"w::u": u, "w::v": v})
    b = factor_products({"w::u": -u, "w::v": -v})                             # the same change, factored with other signs
    assert list(a) == ["w::u@v"] and differences(tensor_print(a["w::u@v"]), tensor_print(b["w::u@v"])) == []
