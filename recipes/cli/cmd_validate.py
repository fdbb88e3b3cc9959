"""`lesion validate`: check a spec."""

from __future__ import annotations

from recipes.jobs.flag_checks import load_spec_for


def add_parser(sub, parents) -> None:
    v = sub.add_parser("validate", parents=parents, help="check a spec")
    v.add_argument("spec")
    v.add_argument("--model", default=None)
    v.add_argument("--compile", action="store_true", help="also load the model and compile (no forward pass)")
    v.set_defaults(fn=main)


def main(args) -> int:
    spec = load_spec_for(args.spec, args.model)
    if args.compile:
        from recipes.cli.runners import compile_check

        print(compile_check(spec))
        return 0
    items = spec.requests if spec.kind == "edit" and spec.modality == "language" else \
        spec.concepts if spec.kind == "erase" else spec.images if spec.kind == "decompose" else \
        getattr(spec, "prompts", None) or getattr(spec, "questions", None) or getattr(spec, "examples", ())
    noun = {"edit": "request", "erase": "concept", "probe": "example", "decompose": "image source"}.get(spec.kind, "prompt")
    if spec.kind == "edit" and spec.modality == "vision-language":
        noun = "question"
    more = f" + those of {spec.requests_from.path}" if getattr(spec, "requests_from", None) else ""
    print(f"ok: {spec.kind} spec ({spec.modality}), {len(items)} {noun}(s){more}, model {spec.model}")
    return 0
