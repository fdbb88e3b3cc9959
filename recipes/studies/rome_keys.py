"""Which edit makes sequential ROME lose the held-out facts? Replay a sequential edit spec one request at a time.

    python -m recipes.studies.rome_keys --method rome --edits 10 --out runs/rome_keys.json
    python -m recipes.studies.rome_keys --method r-rome --edits 10 --out runs/r_rome_keys.json

For the first `--edits` requests of `--spec` (default: the SmolLM2 sequential ROME recipe), with its layer,
templates and key statistics, it applies each ROME (or r-ROME) edit in turn and records after each:
`key_agreement` ((C⁻¹k*)ᵀk_plain / (C⁻¹k*)ᵀk*, ROME's denominator over r-ROME's), the cosine of the plain
prompt's key with k*, that edit's ‖ΔW‖ / ‖W₀‖ and the running total, and top-1 accuracy on the fact set's
held-out known facts. The numbers in editors/README.md ("Why ten ROME edits cost 60% of the held-out
facts") come from it. The last line printed is the rows as one JSON list.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

SPEC = Path(__file__).resolve().parents[1] / "edit" / "sequential_smollm2_rome.yaml"


def replay(spec, model, tokenizer, edits: int) -> list[dict]:
    """The rows described in the module docstring, one per edit after a row for the unedited model."""
    from editors.delta import apply
    from editors.editor import Editor, edit_request
    from editors.evaluate import top1_accuracy
    from editors.methods.rome import compute_rome, weight_matrix
    from editors.requests import read_requests
    from editors.sequential import read_heldout

    requests = [edit_request(r) for r in read_requests(spec.requests_from)[:edits]]
    heldout = read_heldout(spec.requests_from.path)
    editor, layer = Editor(spec, model, tokenizer), spec.layer
    first = weight_matrix(model, layer).double()
    rows = [{"edit": 0, "heldout": top1_accuracy(model, tokenizer, heldout)}]
    for i, request in enumerate(requests, 1):
        before = weight_matrix(model, layer).double()
        delta, info = compute_rome(model, tokenizer, request, editor.hp, C=editor.C[layer], method=spec.method,
                                   base_model=spec.model, templates=editor.templates)
        apply(model, delta)
        after = weight_matrix(model, layer).double()
        k_star, k_plain = info["k_star"].double().cpu(), info["k_plain"].double().cpu()
        rows.append({"edit": i, "subject": request.subject, "prompt": request.prompt,
                     "key_agreement": info["key_agreement"],
                     "cos_k_plain_k_star": float(torch.nn.functional.cosine_similarity(k_plain, k_star, dim=0)),
                     "update_norm": float((after - before).norm() / first.norm()),
                     "total_norm": float((after - first).norm() / first.norm()),
                     "heldout": top1_accuracy(model, tokenizer, heldout)})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    from interventions import load_model
    from interventions.spec.catalogue import load_spec

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", type=Path, default=SPEC)
    ap.add_argument("--method", choices=("rome", "r-rome"), default="rome")
    ap.add_argument("--edits", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = load_spec(args.spec).model_copy(update={"method": args.method})
    model, tokenizer = load_model(spec.model)
    rows = replay(spec, model, tokenizer, args.edits)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
