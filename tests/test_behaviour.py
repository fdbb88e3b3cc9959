"""Rule 4 of the layout: behaviour is unchanged. Each shipped recipe in `support.golden.CASES`, run at small
settings through the CLI, gives the outputs recorded in tests/golden/ before the restructuring:
JSON numbers equal to 1e-6, tensors (deltas included) bit for bit. Each run's `lesion report` page must
show exactly the values its files hold."""

from __future__ import annotations

import json

import pytest

from interventions.report import write_report
from support.golden import CASES, GOLDEN, differences, run_case
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
    assert differences(base, {"a": [1.0, {"b": 0.5 + 1e-5}], "t": "sha x"}) == ["/a[1]/b: 0.50001, expected 0.5"]
    assert differences(base, {"a": [1.0, {"b": 0.5}], "t": "sha y"}) == ["/t: 'sha y', expected 'sha x'"]
    assert differences(base, {"a": [1.0], "t": "sha x"}) == ["/a: length 1, expected 2"]
