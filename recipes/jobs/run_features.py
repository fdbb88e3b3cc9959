"""`kind: features`: the features and neurons report, its concept table and the spec."""

from __future__ import annotations

import json
from pathlib import Path

from interventions.core.atomic import atomic_write


def features_job(spec, args, out: Path) -> None:
    from interventions.api import load_for
    from interventions.features.readout import concept_table, concept_vectors, run_features, spec_units
    from interventions.spec import dump_spec
    from interventions.spec.lens_specs import concept_file

    model, tokenizer, processor = load_for(spec.modality, spec.model)
    d, layer = spec_units(spec, model)
    report = run_features(spec, model, tokenizer, (d, layer), processor)
    written = []
    if d is not None and report["concepts"]:
        for concept, vector in concept_vectors(report, d).items():
            name = concept_file(concept).replace("concept_", "feature_", 1)
            vector.save(out / name)
            written.append(name)
    atomic_write(out / "report.json", json.dumps(report, indent=1, ensure_ascii=False).encode())
    atomic_write(out / "spec.yaml", dump_spec(spec).encode())
    written = ["report.json", "spec.yaml", *written]
    if report["concepts"]:
        table = concept_table(report)
        atomic_write(out / "table.md", table.encode())
        written.append("table.md")
        print(table, end="")
    for kind in ("features", "neurons"):
        for row in report.get(kind, [])[:3]:
            print(f"{kind[:-1]} {row['unit']} (active on {row['active_share']:.0%}): "
                  + " | ".join(e["text"] for e in row["examples"][:2]))
    print(f"wrote {', '.join(written)} to {args.out}")
