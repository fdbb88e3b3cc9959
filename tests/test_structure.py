"""The rules that keep the layout readable, each checked here (rule 4, unchanged behaviour, is
tests/test_behaviour.py):

1. imports point one way: recipes -> editors -> interventions, and down the floors inside each package,
   function-local imports included; no circles;
2. no function over 60 lines;
3. no module name used twice across the packages, and one word per modality in module names;
5. the public Python API still works, and old import paths fail with one line naming the new path.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from support.import_graph import circles, edges, floor, modules, upward

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60


def test_imports_have_no_circles_and_point_down():
    graph = edges()
    assert circles(graph) == []
    assert upward(graph) == []


def test_the_graph_sees_function_local_imports(tmp_path):
    """The parser counts an import inside a function as an edge, and a circle made of them as a circle."""
    graph = edges()
    assert "interventions.models.sites" in graph["interventions.engine.plan"]
    local = [m for m, path in modules().items()
             if any(isinstance(n, ast.ImportFrom) and n.module == "interventions.modalities.vision_language.llava"
                    for f in ast.walk(ast.parse(path.read_text())) if isinstance(f, ast.FunctionDef)
                    for n in ast.walk(f))]
    assert local and all("interventions.modalities.vision_language.llava" in graph[m] for m in local)
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_packages_import_one_way():
    order = {"interventions": 0, "editors": 1, "recipes": 2}
    bad = [(a, b) for a, targets in edges().items() for b in targets
           if order[b.split(".")[0]] > order[a.split(".")[0]]]
    assert bad == []


def test_every_module_has_a_floor():
    assert all(isinstance(floor(m), int) for m in modules())


def long_functions(paths) -> list[str]:
    out = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_LINES:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_no_function_is_over_60_lines():
    assert long_functions(modules().values()) == []


def test_the_length_rule_counts_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(f"def f():\n{body}\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert long_functions([tmp_path / "m.py"]) == [f"m.py:1 f ({MAX_LINES + 1} lines)"]
    finally:
        ROOT = saved


def test_no_module_name_is_used_twice():
    leaves = Counter(name.rpartition(".")[2] for name, path in modules().items() if path.name != "__init__.py")
    assert sorted(name for name, n in leaves.items() if n > 1) == []


def test_one_word_per_modality_in_module_names():
    """'vision_language' and 'text_to_image', never 'vlm' or 'diffusion', in the packages' module names."""
    assert [m for m in modules() if re.search(r"vlm|diffusion", m)] == []


def test_the_public_api_imports():
    from editors.delta import applied, load_delta
    from interventions import compile_spec, load_model, parse_spec, run

    assert all(callable(f) for f in (applied, load_delta, compile_spec, load_model, parse_spec, run))


@pytest.mark.parametrize("old, new", [
    ("interventions.vlm", "interventions.modalities.vision_language.llava"),
    ("interventions.errors", "interventions.core.errors"),
    ("editors.rome", "editors.methods.rome"),
    ("recipes.edit", "editors.editor"),
    ("recipes.runners", "recipes.cli.runners"),
])
def test_an_old_module_path_names_the_new_one(old, new):
    """In a fresh interpreter: the import fails with one line that names where the module went."""
    proc = subprocess.run([sys.executable, "-c", f"import {old}"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"ModuleNotFoundError: `{old}` moved to `{new}`; import it from there"


@pytest.mark.parametrize("package, name, new", [
    ("interventions.engine", "run_plan", "interventions.engine.execute"),
    ("interventions.models", "load_model", "interventions.models.loading"),
    ("interventions.spec", "parse_spec", "interventions.spec.catalogue"),
])
def test_an_old_name_on_a_package_still_works(package, name, new):
    """The three modules that became packages of the same name still give their old names."""
    assert getattr(importlib.import_module(package), name) is getattr(importlib.import_module(new), name)


def test_imports_follow_one_order():
    """isort's order (standard library, third party, first party), as ruff checks it with pyproject.toml's rules."""
    ruff = Path(sys.executable).with_name("ruff")
    proc = subprocess.run([str(ruff), "check", "--quiet", "interventions", "editors", "recipes", "tests"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_every_runner_names_a_job_that_exists():
    """`lesion run`'s table names each job as 'module:function' in recipes/jobs (imported when it runs):
    every name resolves to a function, and every (kind, modality) the specs have has a runner."""
    from interventions.spec import SPEC_CLASSES
    from recipes.cli.runners import RUNNERS

    assert set(RUNNERS) == set(SPEC_CLASSES)
    for key, runner in RUNNERS.items():
        assert callable(runner.function()), key
