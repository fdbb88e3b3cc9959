"""`lesion import`: read a PEFT LoRA adapter on linear layers as a delta."""

from __future__ import annotations

from recipes.jobs.flag_checks import model_for


def add_parser(sub, parents) -> None:
    im = sub.add_parser("import", parents=parents, help="read a PEFT LoRA adapter on linear layers as a delta")
    im.add_argument("adapter", help="a PEFT adapter folder")
    im.add_argument("--model", required=True, help="the base model the adapter was made for")
    im.add_argument("--out", required=True, help="the delta file to write")
    im.set_defaults(fn=main)


def main(args) -> int:
    """`lesion import ADAPTER --model M --out FILE`: a PEFT LoRA adapter as a Delta."""
    from editors.export import import_peft
    from interventions.core.atomic import check_out_file

    check_out_file(args.out, "the delta")
    model, _ = model_for(args.model)
    delta = import_peft(model, args.adapter, base_model=args.model)
    path = delta.save(args.out)
    print(f"wrote {path}: {len(delta.names)} layer(s) from {args.adapter}, delta {delta.id[:12]}")
    return 0
