"""What `lesion run` does with `kind: decompose` on a contrastive model: the text-span decomposition, its report,
its tensors, the head table and the figure, in `--out`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from interventions.core.atomic import atomic_write


def decompose_job(spec, args, out: Path) -> None:
    from safetensors.torch import save_file

    from interventions.api import load_for
    from interventions.modalities.contrastive.heads import decompose_report, head_table, save_figure
    from interventions.spec import spec_to_dict

    clip, tokenizer, processor = load_for(spec.modality, spec.model, device=args.device)
    start = time.perf_counter()
    report, tensors = decompose_report(spec, clip, tokenizer, processor)
    report.update(spec=spec_to_dict(spec), model=spec.model, seconds=round(time.perf_counter() - start, 1))
    atomic_write(out / "result.json", (json.dumps(report, indent=1) + "\n").encode())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "result.safetensors"))
    atomic_write(out / "heads.md", head_table(report).encode())
    save_figure(report, out / "heads.png")
    print(f"decomposed {report['images']} images of {spec.model} into {report['layers']} layers × "
          f"{report['heads_per_layer']} heads (largest error of the sum {report['decomposition_max_error']:.2e}) "
          f"in {report['seconds']} s")
    for name, q in report["questions"].items():
        print(f"  {name}: accuracy {q['accuracy']:.3f} (against the {q['scored_against']}), with layers 0..L-1 "
              f"mean-ablated: {', '.join(f'{a:.2f}' for a in q['layer_ablation'])}")
    for attribute, heads in report["named_heads"].items():
        kept = ", ".join(f"{q} {a:.2f}" for q, a in report["named_ablation"][attribute].items())
        print(f"  {attribute} heads {heads}: ablated together, accuracy {kept}")
    print(f"wrote result.json, result.safetensors, heads.md, heads.png to {args.out}")
