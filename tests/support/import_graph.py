"""The import graph of Lesion's three packages, function-local imports included, read with `ast`.

    python tests/support/import_graph.py            # one line per module: its floor and what it imports
    python tests/support/import_graph.py --check    # only the problems: circles and upward edges (exit 1 if any)

Floors are the rule: a module may import modules on its own floor or below, never above, and the graph
has no circles. Package faces (`__init__.py`) may import their own children.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("interventions", "editors", "recipes")

#: module-name prefix -> floor; the longest matching prefix decides
FLOORS = {
    "interventions.core": 0,
    "interventions.spec": 1, "interventions.models": 1, "interventions.testbeds": 1, "interventions.report": 1,
    "interventions.engine": 2,
    "interventions.modalities": 3,
    "interventions.lenses": 4, "interventions.features": 4,
    "interventions.api": 5,
    "interventions": 6,
    "editors.delta": 10, "editors.stats": 10, "editors.evaluate": 10, "editors.requests": 10,
    "editors.methods": 11, "editors.locate": 11, "editors.export": 11, "editors.sequential": 11,
    "editors.editor": 12,
    "editors": 13,
    "recipes.jobs": 20,
    "recipes.train": 21,
    "recipes.bench": 22, "recipes.studies": 22,
    "recipes.cli": 23,
    "recipes": 24,
}


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = f
    return found


def floor(module: str) -> int:
    best = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return FLOORS[best]


def _targets(module: str, path: Path, node, known: dict[str, Path]) -> set[str]:
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
        names = [base] + [f"{base}.{a.name}" for a in node.names]
    out = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def edges() -> dict[str, set[str]]:
    known = modules()
    graph = {m: set() for m in known}
    for module, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, path, node, known):
                    face_of_child = target.startswith(module + ".") and path.name == "__init__.py"
                    # `from pkg.sub import x` also names the faces `pkg` and `pkg.sub`: not edges of their own
                    if target != module and not face_of_child and not any(
                            t.startswith(target + ".") for t in _targets(module, path, node, known) if t != target):
                        graph[module].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]; counter[0] += 1; stack.append(start); on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1; stack.append(w); on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop(); on.discard(w); comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() for b in targets if floor(b) > floor(a))


def main(argv: list[str]) -> int:
    graph = edges()
    problems = [f"circle: {' -> '.join(c)}" for c in circles(graph)]
    problems += [f"upward: {a} (floor {floor(a)}) imports {b} (floor {floor(b)})" for a, b in upward(graph)]
    if "--check" not in argv:
        for module in sorted(graph, key=lambda m: (floor(m), m)):
            print(f"{floor(module):>2} {module}: {', '.join(sorted(graph[module])) or '-'}")
    print("\n".join(problems) if problems else f"{len(graph)} modules, {sum(map(len, graph.values()))} edges: "
                                                 "no circles, no upward imports")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
