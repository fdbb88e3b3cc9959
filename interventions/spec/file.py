"""Reading spec files: YAML within stated bounds, every failure a `SpecError` naming the file.

>>> load_yaml("kind: trace\\nsamples: 3\\n")
{'kind': 'trace', 'samples': 3}
>>> load_yaml("a: 1\\na: 2\\n")
Traceback (most recent call last):
...
interventions.core.errors.SpecError: `<string>`: got 'a' (line 2); expected each key once (YAML lets the last one win silently)

The bounds, each a module constant:
- a spec file is at most `MAX_BYTES` (1 MB) of UTF-8 text;
- mappings and lists nest at most `MAX_DEPTH` (32) levels;
- with aliases expanded (``&a``/``*a``), the document has at most `MAX_NODES` (100,000) values, so a
  "billion laughs" file is refused before it is built;
- an integer has at most 4,300 digits (Python's own limit on converting text).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from interventions.core.errors import SpecError, short
from interventions.core.reading import LIMITS, MAX_DEPTH, read_text

MAX_BYTES = LIMITS["spec"]
MAX_NODES = 100_000


def read_spec_text(path: str | Path) -> str:
    """The text of a spec file: an existing, readable, regular UTF-8 file of at most `MAX_BYTES`."""
    return read_text(path, "spec", "the YAML spec", "spec")


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys and documents nested or expanded past the bounds."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nesting at most {MAX_DEPTH} levels deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                raise _Refused("keys that are plain values, not lists or mappings", key_node.start_mark) from None
            if duplicate:
                raise _Refused("each key once (YAML lets the last one win silently)", key_node.start_mark, key)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


#: YAML 1.2 (and JSON) read ``1e30`` and ``2E-3`` as numbers; PyYAML follows YAML 1.1, which needs a dot
#: (``1.0e30``) and reads them as text, so a JSON spec's ``"coef": 1e+30`` would be refused as "not a number".
#: This loader (only) resolves them as floats too.
_BoundedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))


class _Refused(Exception):
    def __init__(self, allowed: str, mark, value: Any = None):
        self.allowed, self.mark, self.value = allowed, mark, value


def _expanded_size(node, memo: dict) -> int:
    """How many values `node` stands for with every alias expanded (computed without expanding)."""
    found = memo.get(id(node))
    if found is not None:
        return found
    memo[id(node)] = MAX_NODES + 1   # a node that contains itself expands without end
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, memo) for v in node.value)
    else:
        size = 1
    memo[id(node)] = size = min(size, MAX_NODES + 1)
    return size


def load_yaml(text: str, *, source: str = "<string>") -> Any:
    """Parse YAML text within the bounds above; any failure is a `SpecError` naming `source`, with the line."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_NODES:
            raise SpecError(source, "<alias-expanded document>", f"at most {MAX_NODES:,} values with YAML aliases "
                                                                   "expanded")
        return loader.construct_document(node)
    except SpecError:
        raise
    except _Refused as err:
        line = f" (line {err.mark.line + 1})" if err.mark else ""
        value = short(err.value) if err.value is not None else "a document"
        raise SpecError.many([f"`{source}`: got {value}{line}; expected {err.allowed}"]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError(source, f"malformed YAML{where}", f"valid YAML ({short(problem)})") from None
    except ValueError:    # an integer past Python's 4,300-digit conversion limit
        raise SpecError(source, "a number too long to read", "numbers of at most 4,300 digits") from None
    except RecursionError:
        raise SpecError(source, "a deeply nested document", f"nesting at most {MAX_DEPTH} levels deep") from None
    finally:
        loader.dispose()
