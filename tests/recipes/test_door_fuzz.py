"""The seeded door fuzz (`support.doors`): request files, side files, images, tuned lenses, steering
vectors, probes, `compare`, `report`, seeds and sizes, and `--out` paths, each case through the command line.

Every case must be refused cleanly: exit 2, one `error:` line, no traceback, no hang, and every file in
the workspace (the models' weights included) byte for byte as before. On main 0219d17 the same 188
cases gave 108 clean refusals, 53 tracebacks and 27 acceptances (`python tests/support/doors.py`).
"""

from __future__ import annotations

from collections import Counter

import pytest

from support.doors import all_cases, build_workspace, judge


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("doors")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LESION_HOME", str(ws / "home"))
        build_workspace(ws)
        yield ws


def test_every_seeded_bad_input_is_refused_cleanly_and_changes_nothing(workspace):
    cases = all_cases(workspace, seed=0)
    verdicts = [(case, judge(case, workspace, i)) for i, case in enumerate(cases)]
    bad = [(c.surface, c.name, v.kind, v.detail[:200]) for c, v in verdicts if v.kind != "clean"]
    assert bad == []
    surfaces = Counter(c.surface for c in cases)
    assert len(cases) >= 180 and set(surfaces) >= {
        "requests_from", "corpus", "sequential.heldout", "sequential.text", "image", "tuned lens",
        "steering vector", "probe", "compare", "report", "seed", "--memory", "--out"}
    named = [v.detail for c, v in verdicts if c.surface in ("image", "tuned lens", "compare", "report")]
    assert all(d.startswith("error: `") for d in named)          # each names its field first


def test_another_seed_draws_other_damage_that_is_refused_too(workspace):
    first, other = all_cases(workspace, seed=0), all_cases(workspace, seed=1)
    assert [c.name for c in first] != [c.name for c in other]
    damaged = [c for c in other if "cut at" in c.name or "bit flip" in c.name]
    verdicts = [judge(case, workspace, 500 + i) for i, case in enumerate(damaged)]
    assert len(damaged) > 40 and [v.kind for v in verdicts] == ["clean"] * len(damaged)
