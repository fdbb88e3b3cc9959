"""`lesion schema`: print the JSON Schema of all specs."""

from __future__ import annotations

import json


def add_parser(sub, parents) -> None:
    s = sub.add_parser("schema", parents=parents, help="print the JSON Schema of all specs")
    s.set_defaults(fn=main)


def main(args) -> int:
    from interventions import spec_schema

    print(json.dumps(spec_schema(), indent=2))
    return 0
