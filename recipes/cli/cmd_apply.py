"""`lesion apply`: apply saved deltas and generate with and without them."""

from __future__ import annotations

from interventions.core.atomic import check_out
from interventions.core.errors import SpecError
from recipes.jobs.flag_checks import check_spec_files, device_flag, finite_float, natural_int, positive_int


def add_parser(sub, parents) -> None:
    a = sub.add_parser("apply", parents=parents, help="apply saved deltas and generate with and without them")
    a.add_argument("--model", default="smollm2-135m")
    a.add_argument("--delta", action="append", default=None, help="a delta file (repeat to stack several)")
    a.add_argument("--steer", default=None, help="a steering vector file (from a `kind: steer` run)")
    a.add_argument("--coef", type=finite_float, default=4.0, help="the steering vector's coefficient")
    a.add_argument("--apply-to", default="all", choices=("all", "prompt", "generated"),
                   help="steer at: all | prompt | generated positions")
    a.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    a.add_argument("--max-new-tokens", type=positive_int, default=20)
    a.add_argument("--images", type=positive_int, default=8, help="text-to-image: images per prompt (one per seed)")
    a.add_argument("--image", default=None, help="vision-language: the image the prompts ask about "
                                                 "(flag:<Country> or an image file)")
    a.add_argument("--seed", type=natural_int, default=0, help="text-to-image: the first seed")
    a.add_argument("--out", default=None, help="text-to-image: a folder for grid.png and report.json")
    a.add_argument("--device", type=device_flag, default="cpu", help="cpu, cuda, cuda:1 ...")
    a.set_defaults(fn=main)


def main(args) -> int:
    """`lesion apply`: flags, not a spec; the model family is told by the model name (the testbeds, or
    what a local folder holds), since there is no spec to say it."""
    _check_prompts(args.prompt)
    from interventions.models.families import model_modality

    modality = model_modality(args.model)
    if modality == "vision-language":
        return _apply_vision_language(args)
    if args.image is not None:
        raise SpecError("--image", args.image, "nothing: --image is for vision-language models (e.g. llava-flags-smollm2)")
    if modality == "text-to-image":
        return _apply_text_to_image(args)
    if args.out is not None:
        raise SpecError("--out", args.out, "nothing: --out is for text-to-image models (it writes grid.png)")
    from interventions.spec import parse_spec
    from recipes.cli.runners import RUNNERS

    spec = parse_spec({"kind": "apply", "model": args.model, "deltas": args.delta or [], "prompts": args.prompt,
                       "steer": args.steer, "coef": args.coef, "apply_to": args.apply_to,
                       "max_new_tokens": args.max_new_tokens})
    check_spec_files(spec)
    RUNNERS[("apply", "language")].run(spec, args, None)
    return 0


def _apply_vision_language(args) -> int:
    if args.image is None or args.steer or not args.delta:
        raise SpecError("--image", args.image, "an image (flag:<Country> or a file) and --delta files for a "
                        "vision-language model (no --steer)")
    from interventions.spec import parse_spec
    from recipes.jobs.run_vision_language import apply_and_answer

    check_spec_files(parse_spec({"kind": "apply", "deltas": args.delta, "prompts": args.prompt}))
    for row in apply_and_answer(args.model, args.delta, args.image, args.prompt, max_new_tokens=args.max_new_tokens,
                                device=args.device):
        print(f"image {args.image}, prompt: {row['prompt']!r}\n  base:   {row['base']!r}\n  edited: {row['edited']!r}")
    return 0


def _apply_text_to_image(args) -> int:
    if args.steer:
        raise SpecError("--steer", args.steer, "nothing: steering vectors are for language models")
    from contextlib import nullcontext

    from interventions.core.atomic import atomic_folder
    from interventions.spec import parse_spec
    from recipes.cli.runners import RUNNERS

    spec = parse_spec({"kind": "apply", "modality": "text-to-image", "model": args.model,
                       "deltas": args.delta or [], "prompts": args.prompt, "images": args.images, "seed": args.seed})
    check_spec_files(spec)
    out = check_out(args.out, False, "")
    with (atomic_folder(out) if out is not None else nullcontext(None)) as staging:
        RUNNERS[("apply", "text-to-image")].run(spec, args, staging)
    return 0


def _check_prompts(prompts: list[str]) -> None:
    """Each `--prompt` by the spec's own rule for texts, before anything heavy is imported."""
    from pydantic import TypeAdapter, ValidationError

    from interventions.spec import Text
    from interventions.spec.messages import expected

    for i, p in enumerate(prompts):
        try:
            TypeAdapter(Text).validate_python(p)
        except ValidationError as err:
            raise SpecError(f"--prompt (#{i + 1})", p, expected(err.errors()[0])) from None
