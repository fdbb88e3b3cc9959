"""The `lesion` command line.

    lesion run recipes/trace/trace_eiffel.yaml --out runs/eiffel
    lesion validate recipes/trace/trace_eiffel.yaml [--compile]
    lesion schema > lesion.schema.json
    lesion apply --model smollm2-135m --delta runs/edit/delta.safetensors --prompt "The Eiffel Tower is in"
    lesion apply --steer runs/steer/vector.safetensors --coef 8 --prompt "I went out yesterday and"
    lesion bench-trace --threads 2
    lesion bench-patch --threads 2
    lesion bench-edit --threads 2
    lesion bench-steer --threads 2
    lesion run recipes/erase/erase_red.yaml --out runs/erase_red           # text-to-image: erase a concept
    lesion apply --model shapes-diffusion --delta runs/erase_red/delta.safetensors --prompt "a red circle" --out g
    lesion bench-erase --threads 2

Errors a user can cause print one clear message and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from interventions.core.atomic import check_out
from interventions.core.errors import LesionError, SpecError, clip
from recipes.cli.checks import (
    check_spec_files, device_flag, finite_float, natural_int, parse_device_map, positive_int,
)


def _load(path: str, model: str | None):
    from interventions.spec.kinds import load_spec, parse_spec, spec_to_dict

    spec = load_spec(path)
    if model is not None:
        spec = parse_spec({**spec_to_dict(spec), "model": model})
    return spec


def cmd_run(args) -> int:
    """Everything a user can get wrong is checked before the model loads; the result is written to a
    staging folder that becomes `--out` only when the run has finished."""
    from contextlib import nullcontext

    from interventions.core.atomic import atomic_folder
    from interventions.core.units import parse_bytes
    from recipes.train.manifest import check_name
    from recipes.cli.runners import runner_for

    spec = _load(args.spec, args.model)
    runner = runner_for(spec, args)
    check_spec_files(spec)
    parse_device_map(args.device_map)
    if args.memory:
        parse_bytes(args.memory, "--memory")
    if args.checkpoint:
        check_name(args.checkpoint)
    out = check_out(args.out, runner.writes, f"a `kind: {spec.kind}` spec")
    from interventions.core.distributed import init_from_env, world   # torch: only once the flags are known good

    if init_from_env() and not runner.distributed:
        raise SpecError("kind", spec.kind, "'trace' or 'patch' on a language model under torchrun (other kinds "
                                           "run in one process)")
    args.shipping = None
    with (atomic_folder(out) if out is not None and world()[0] == 0 else nullcontext(None)) as staging:
        status = runner.run(spec, args, staging)
    if args.checkpoint and args.shipping is not None:
        _ship(args, spec)
    return status


def _ship(args, spec) -> None:
    from pathlib import Path

    from recipes.train.manifest import register

    row = register(Path(args.out) / "delta.safetensors", f"{args.checkpoint}.safetensors", kind="delta",
                   recipe=args.spec, command=" ".join(["lesion"] + (args.argv or [])), base_model=spec.model,
                   **args.shipping)
    print(f"shipped checkpoints/{row['path']} ({row['bytes']} bytes, sha256 {row['sha256'][:12]}…) "
          f"and its manifest entry")


def _check_prompts(prompts: list[str]) -> None:
    """Each `--prompt` by the spec's own rule for texts, before anything heavy is imported."""
    from pydantic import TypeAdapter, ValidationError

    from interventions.spec.messages import expected
    from interventions.spec.kinds import Text

    for i, p in enumerate(prompts):
        try:
            TypeAdapter(Text).validate_python(p)
        except ValidationError as err:
            raise SpecError(f"--prompt (#{i + 1})", p, expected(err.errors()[0])) from None


def _model_for(name: str):
    """A language model or a VLM by its name (the delta's base, or --model): `(model, tokenizer)`."""
    from interventions.modalities.vision_language.llava import is_vlm_model, load_language_or_vision

    return load_language_or_vision(name, vision=is_vlm_model(name))[:2]


def cmd_export(args) -> int:
    """`lesion export DELTA [DELTA ...] --to peft|diffusers --out DIR` (one PEFT LoRA adapter folder, or
    diffusers LoRA weights), or `--merged` (the edited model as a Hugging Face folder)."""
    from editors.delta import load_delta
    from editors.export import export_peft

    if args.to == "gguf":       # one file, not a folder
        from pathlib import Path

        out = Path(args.out)
        if out.is_dir() or out.suffix != ".gguf":
            raise SpecError("--out", args.out, "a .gguf file path (not a folder)")
    else:
        out = check_out(args.out, True, "the adapter")
    from interventions.modalities.text_to_image.pipeline import is_diffusion_model

    if (args.to is None) == (not args.merged):
        raise SpecError("--to", args.to, "one of 'peft', 'diffusers', 'gguf', or --merged instead of --to "
                                         "(not both)")
    if args.to == "gguf":
        return _export_gguf(args, out)
    deltas = [load_delta(p) for p in args.delta]
    name = args.model or deltas[0].meta.get("base_model")
    if args.merged:
        if is_diffusion_model(name) or args.each:
            raise SpecError("--merged", True, "a language-model or vision-language delta, without --each "
                            f"(got {'a text-to-image base' if is_diffusion_model(name) else '--each'})")
        from editors.export import export_merged

        model, tokenizer = _model_for(name)
        export_merged(model, tokenizer, deltas, out)
        print(f"wrote {name} with {len(deltas)} delta(s) merged to {out} (a Hugging Face folder; config.json "
              "readable by transformers 4.x and 5.x)")
        return 0
    if args.to == "diffusers" and not is_diffusion_model(name):
        raise SpecError("--to", args.to, f"'peft' or 'gguf' for a language-model or vision-language delta (its base "
                        f"is {name!r})")
    if is_diffusion_model(name):
        from editors.export import export_diffusers
        from interventions.modalities.text_to_image.pipeline import load_pipeline

        if args.each:
            raise SpecError("--each", True, "nothing for a text-to-image delta (export each delta on its own)")
        pipe = load_pipeline(name)
        if args.to == "peft":
            export_peft(pipe, deltas, out, base_model=name)
            print(f"wrote PEFT LoRA adapters of {len(deltas)} delta(s) on {name} to {out}, one per part it changes "
                  "(unet/, text_encoder/)")
            return 0
        export_diffusers(pipe, deltas, out)
        print(f"wrote diffusers LoRA weights of {len(deltas)} delta(s) on {name} to {out} "
              "(pytorch_lora_weights.safetensors; StableDiffusionPipeline.load_lora_weights loads it)")
        return 0
    model, _ = _model_for(name)
    if not args.each:
        export_peft(model, deltas, out, base_model=name)
        print(f"wrote a PEFT LoRA adapter of {len(deltas)} delta(s) on {name} to {out} "
              "(adapter_config.json, adapter_model.safetensors)")
        return 0
    from pathlib import Path

    from interventions.core.atomic import atomic_folder

    names = [Path(p).name.removesuffix(".safetensors") for p in args.delta]
    if len(set(names)) != len(names):
        raise SpecError("DELTA", args.delta, "files with different names: --each names each adapter by its file")
    with atomic_folder(out) as staging:
        for adapter, delta in zip(names, deltas):
            export_peft(model, [delta], staging / adapter, base_model=name)
    print(f"wrote {len(deltas)} named PEFT LoRA adapters on {name} under {out}: {', '.join(names)}")
    return 0


def _export_gguf(args, out) -> int:
    """`--to gguf`: deltas as a llama.cpp LoRA adapter, or one steering vector as a control vector."""
    from editors.delta import load_delta
    from editors.export import export_control_vector, export_gguf_lora
    from interventions.lenses.steering import META_KEY as STEER_KEY, load_vector
    from interventions.core.tagged import existing_file

    if args.each:
        raise SpecError("--each", True, "nothing with --to gguf (llama.cpp takes several --lora files itself)")
    if existing_file(args.delta[0]):
        from safetensors import safe_open

        try:
            with safe_open(args.delta[0], "pt") as f:
                steer = STEER_KEY in (f.metadata() or {})
        except Exception:   # noqa: BLE001 - load_delta below says what is wrong with the file
            steer = False
        if steer:
            if len(args.delta) > 1:
                raise SpecError("DELTA", args.delta, "one steering vector file for a control vector")
            vector = load_vector(args.delta[0])
            model, _ = _model_for(args.model or vector.meta.get("model"))
            export_control_vector(vector, model, out)
            print(f"wrote a llama.cpp control vector (layers {vector.layers}, unscaled) to {out}; llama.cpp: "
                  f"--control-vector-scaled {out} COEF")
            return 0
    deltas = [load_delta(p) for p in args.delta]
    model, _ = _model_for(args.model or deltas[0].meta.get("base_model"))
    export_gguf_lora(model, deltas, out)
    print(f"wrote a llama.cpp LoRA adapter of {len(deltas)} delta(s) to {out}; llama.cpp: --lora {out}")
    return 0


def cmd_import(args) -> int:
    """`lesion import ADAPTER --model M --out FILE`: a PEFT LoRA adapter as a Delta."""
    from editors.export import import_peft

    model, _ = _model_for(args.model)
    delta = import_peft(model, args.adapter, base_model=args.model)
    path = delta.save(args.out)
    print(f"wrote {path}: {len(delta.names)} layer(s) from {args.adapter}, delta {delta.id[:12]}")
    return 0


def cmd_apply(args) -> int:
    """`lesion apply`: flags, not a spec; the model family is told by the model name (the testbeds, or
    what a local folder holds), since there is no spec to say it."""
    _check_prompts(args.prompt)
    from interventions.modalities.text_to_image.pipeline import is_diffusion_model
    from interventions.spec.kinds import parse_spec
    from interventions.modalities.vision_language.llava import is_vlm_model
    from recipes.cli.runners import run_apply, run_diffusion_apply

    if is_vlm_model(args.model):
        if args.image is None or args.steer or not args.delta:
            raise SpecError("--image", args.image, "an image (flag:<Country> or a file) and --delta files for a "
                            "vision-language model (no --steer)")
        from recipes.jobs.run_vision_language import run_apply as run_vlm_apply

        check_spec_files(parse_spec({"kind": "apply", "deltas": args.delta, "prompts": args.prompt}))
        for row in run_vlm_apply(args.model, args.delta, args.image, args.prompt, max_new_tokens=args.max_new_tokens,
                                 device=args.device):
            print(f"image {args.image}, prompt: {row['prompt']!r}\n  base:   {row['base']!r}\n  edited: {row['edited']!r}")
        return 0
    if args.image is not None:
        raise SpecError("--image", args.image, "nothing: --image is for vision-language models (e.g. llava-flags-smollm2)")
    if is_diffusion_model(args.model):
        if args.steer:
            raise SpecError("--steer", args.steer, "nothing: steering vectors are for language models")
        spec = parse_spec({"kind": "apply", "modality": "text-to-image", "model": args.model,
                           "deltas": args.delta or [], "prompts": args.prompt, "images": args.images, "seed": args.seed})
        from contextlib import nullcontext

        from interventions.core.atomic import atomic_folder

        check_spec_files(spec)
        out = check_out(args.out, False, "")
        with (atomic_folder(out) if out is not None else nullcontext(None)) as staging:
            return run_diffusion_apply(spec, args, staging)
    if args.out is not None:
        raise SpecError("--out", args.out, "nothing: --out is for text-to-image models (it writes grid.png)")
    spec = parse_spec({"kind": "apply", "model": args.model, "deltas": args.delta or [], "prompts": args.prompt,
                       "steer": args.steer, "coef": args.coef, "apply_to": args.apply_to,
                       "max_new_tokens": args.max_new_tokens})
    check_spec_files(spec)
    return run_apply(spec, args, None)


def cmd_validate(args) -> int:
    spec = _load(args.spec, args.model)
    if args.compile:
        from recipes.cli.runners import compile_check

        print(compile_check(spec))
        return 0
    items = spec.requests if spec.kind == "edit" and spec.modality == "language" else \
        spec.concepts if spec.kind == "erase" else getattr(spec, "prompts", None) or getattr(spec, "questions", None) \
        or getattr(spec, "examples", ())
    noun = {"edit": "request", "erase": "concept", "probe": "example"}.get(spec.kind, "prompt")
    if spec.kind == "edit" and spec.modality == "vision-language":
        noun = "question"
    more = f" + those of {spec.requests_from.path}" if getattr(spec, "requests_from", None) else ""
    print(f"ok: {spec.kind} spec ({spec.modality}), {len(items)} {noun}(s){more}, model {spec.model}")
    return 0


def cmd_schema(args) -> int:
    from interventions import spec_schema

    print(json.dumps(spec_schema(), indent=2))
    return 0


def cmd_eval_edits(args) -> int:
    from recipes.studies.eval_edits import main as evaluate_edits

    return evaluate_edits(args)


def cmd_bench_trace(args) -> int:
    from recipes.bench.bench_trace import main as bench

    return bench(args)


def cmd_train_lens(args) -> int:
    from recipes.train.train_lens import main as train

    return train(args)


def cmd_bench_serve(args) -> int:
    from recipes.bench.bench_serve import main as bench

    return bench(args)


def cmd_bench_patch(args) -> int:
    from recipes.bench.bench_patch import main as bench

    return bench(args)


def cmd_bench_edit(args) -> int:
    from recipes.bench.bench_edit import main as bench

    return bench(args)


def cmd_compare(args) -> int:
    from interventions.engine.compare import compare_saved

    rows = compare_saved(args.a, args.b)
    if not rows:
        raise SpecError("results", [args.a, args.b], "two results with at least one grid in common")
    print("| grid | Pearson r | max abs diff |\n|---|---|---|")
    for grid, r in rows.items():
        print(f"| {grid} | {r['pearson']:.3f} | {r['max_abs_diff']:.2e} |")
    return 0


def cmd_bench_erase(args) -> int:
    from recipes.bench.bench_erase import main as bench

    return bench(args)


def cmd_edit_flag(args) -> int:
    from recipes.studies.edit_flag import main as edit_flag

    return edit_flag(args)


def cmd_trace_flags(args) -> int:
    from recipes.studies.trace_flags import main as trace_flags

    return trace_flags(args)


def cmd_attribution_steps(args) -> int:
    from recipes.studies.attribution_steps import main as measure

    return measure(args)


def cmd_bench_steer(args) -> int:
    from recipes.bench.bench_steer import main as bench

    return bench(args)


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad command line reported as one `error:` line (exit 2), as every other error is."""

    def error(self, message: str):
        self.exit(2, f"error: {clip(message, 400)} (see `{self.prog} --help`)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lesion", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    common = argparse.ArgumentParser(add_help=False)    # --threads may also follow the command
    common.add_argument("--threads", type=positive_int, default=argparse.SUPPRESS,
                        help="torch CPU threads (default: torch's choice)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", parents=[common], help="run a spec: trace/patch write result.json, result.safetensors, heatmap.png, "
                                   "spec.yaml; edit writes delta.safetensors and metrics.json")
    r.add_argument("spec")
    r.add_argument("--out", default=None, help="output folder (not needed for `kind: apply`)")
    r.add_argument("--model", default=None, help="override the spec's `model`")
    r.add_argument("--max-batch-rows", type=positive_int, default=None, help="override the spec's `max_batch_rows`")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--device-map", default=None, metavar="MAP",
                   help="trace/patch: spread the model over devices with accelerate: auto, balanced, sequential, "
                        "or a JSON object of module -> device (\"disk\" offloads); --device is then ignored")
    r.add_argument("--offload-folder", default=None, help="where --device-map puts \"disk\" weights")
    r.add_argument("--memory", default=None, metavar="SIZE",
                   help="trace/patch: bound the sweep's memory beyond the weights, e.g. 512MB or 2GiB; "
                        "chunks and prompt blocks are sized to fit, and the measured peak is reported")
    r.add_argument("--device", type=device_flag, default="cpu", help="cpu, cuda, cuda:1 ... (under torchrun: cuda means each "
                                                   "process's LOCAL_RANK device)")
    r.add_argument("--checkpoint", default=None, metavar="NAME",
                   help="edit specs: also copy the delta to checkpoints/NAME.safetensors and list it in the manifest")
    r.set_defaults(fn=cmd_run)
    v = sub.add_parser("validate", parents=[common], help="check a spec")
    v.add_argument("spec")
    v.add_argument("--model", default=None)
    v.add_argument("--compile", action="store_true", help="also load the model and compile (no forward pass)")
    v.set_defaults(fn=cmd_validate)
    x = sub.add_parser("export", parents=[common], help="write deltas as LoRA weights that serving libraries load "
                                                        "(PEFT: vLLM, TGI, PeftModel; diffusers)")
    x.add_argument("delta", nargs="+", help="delta files (several export as one adapter), or one steering vector")
    x.add_argument("--to", default=None, choices=("peft", "diffusers", "gguf"),
                   help="peft: a PEFT LoRA adapter (language models, VLMs); diffusers: LoRA weights for "
                        "StableDiffusionPipeline.load_lora_weights (text-to-image deltas); gguf: a llama.cpp "
                        "LoRA adapter (deltas) or control vector (a steering vector file)")
    x.add_argument("--out", required=True, help="the adapter folder to write")
    x.add_argument("--model", default=None, help="the base model (default: the delta's own base_model)")
    x.add_argument("--merged", action="store_true", help="instead of --to: the whole edited model as a Hugging Face "
                                                         "folder, for engines that take merged weights")
    x.add_argument("--each", action="store_true", help="one named adapter per delta (OUT/<file name>/) instead of "
                                                       "one adapter adding them all")
    x.set_defaults(fn=cmd_export)
    im = sub.add_parser("import", parents=[common], help="read a PEFT LoRA adapter on linear layers as a delta")
    im.add_argument("adapter", help="a PEFT adapter folder")
    im.add_argument("--model", required=True, help="the base model the adapter was made for")
    im.add_argument("--out", required=True, help="the delta file to write")
    im.set_defaults(fn=cmd_import)
    a = sub.add_parser("apply", parents=[common], help="apply saved deltas and generate with and without them")
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
    a.set_defaults(fn=cmd_apply)
    c = sub.add_parser("compare", parents=[common], help="correlate two results of one spec, e.g. method: exact and attribution")
    c.add_argument("a", help="a result folder")
    c.add_argument("b", help="another result folder")
    c.set_defaults(fn=cmd_compare)
    s = sub.add_parser("schema", parents=[common], help="print the JSON Schema of all specs")
    s.set_defaults(fn=cmd_schema)
    e = sub.add_parser("eval-edits", parents=[common], help="ROME one edit at a time over an edit spec's requests, with metrics")
    e.add_argument("spec")
    e.add_argument("--limit", type=positive_int, default=None, help="only the first N requests")
    e.add_argument("--json", default=None, help="also write the numbers to this file")
    e.set_defaults(fn=cmd_eval_edits)
    b = sub.add_parser("bench-trace", parents=[common], help="benchmark the batched trace against a ROME-style reference loop")
    b.add_argument("--model", default="smollm2-135m")
    b.add_argument("--samples", type=positive_int, default=10)
    b.add_argument("--max-batch-rows", type=positive_int, default=48)
    b.add_argument("--device", type=device_flag, default="cpu")
    b.add_argument("--json", default=None, help="also write the numbers to this file")
    b.add_argument("--memory", default=None, metavar="SIZE", help="run Lesion exact under this memory budget "
                                                                  "and report its measured peak")
    b.set_defaults(fn=cmd_bench_trace)
    bs = sub.add_parser("bench-serve", parents=[common], help="generation speed with the shipped edit in llama.cpp "
                                                              "(LoRA) and transformers + PEFT (unmerged, merged)")
    bs.add_argument("--tokens", type=positive_int, default=64)
    bs.add_argument("--repeats", type=positive_int, default=3)
    bs.set_defaults(fn=cmd_bench_serve)
    bp = sub.add_parser("bench-patch", parents=[common], help="benchmark a 100-prompt patching sweep against a one-forward-per-cell "
                                            "reference loop")
    bp.add_argument("--model", default="smollm2-135m")
    bp.add_argument("--prompts", type=positive_int, default=100)
    bp.add_argument("--max-batch-rows", type=positive_int, default=48)
    bp.add_argument("--reference-prompts", type=positive_int, default=None, metavar="K",
                    help="time the reference loop on K evenly spaced prompts and scale by cells (default: all)")
    bp.add_argument("--device", type=device_flag, default="cpu")
    bp.add_argument("--json", default=None, help="also write the numbers to this file")
    bp.set_defaults(fn=cmd_bench_patch)
    be = sub.add_parser("bench-edit", parents=[common], help="benchmark every edit method's time and peak memory, delta size, apply time, and "
                                           "generation speed edited against base")
    be.add_argument("--spec", default="recipes/edit/bench_edit_smollm2.yaml",
                    help="a `kind: edit` spec with a `layer` (ROME, r-ROME, EMMET): model, requests, hyperparameters")
    be.add_argument("--methods", nargs="+", default=["rome", "r-rome", "emmet", "memit", "alphaedit"],
                    choices=["rome", "r-rome", "emmet", "memit", "alphaedit"])
    be.add_argument("--rome", type=positive_int, default=5, help="time ROME and r-ROME on the first N requests")
    be.add_argument("--batch", type=positive_int, default=100, help="time one EMMET/MEMIT/AlphaEdit batch of the "
                                                                   "first N requests")
    be.add_argument("--memit-layers", type=natural_int, nargs="+", default=[2, 3, 4, 5, 6])
    be.add_argument("--repeats", type=positive_int, default=5, help="alternating base/edited generation rounds")
    be.add_argument("--new-tokens", type=positive_int, default=32)
    be.add_argument("--json", default=None, help="also write the numbers to this file")
    be.set_defaults(fn=cmd_bench_edit)
    tl = sub.add_parser("train-lens", parents=[common], help="train a tuned lens (Belrose et al. 2023) on text the "
                                                            "model writes itself, and save it as safetensors")
    tl.add_argument("--model", default="smollm2-135m")
    tl.add_argument("--out", required=True, help="the tuned lens file to write")
    tl.add_argument("--texts", type=positive_int, default=160, help="texts sampled from the model")
    tl.add_argument("--length", type=positive_int, default=64, help="tokens per sampled text")
    tl.add_argument("--rank", type=natural_int, default=64, help="translator rank (0: full d x d)")
    tl.add_argument("--steps", type=positive_int, default=150)
    tl.add_argument("--batch-tokens", type=positive_int, default=128)
    tl.add_argument("--lr", type=finite_float, default=1e-3)
    tl.add_argument("--max-tokens", type=positive_int, default=8192)
    tl.add_argument("--seed", type=natural_int, default=0)
    tl.set_defaults(fn=cmd_train_lens)
    bs = sub.add_parser("bench-steer", parents=[common], help="benchmark steered against plain generation (tokens per second)")
    bs.add_argument("--model", default="smollm2-135m")
    bs.add_argument("--vector", default=None, help="a vector file (default: estimate recipes/steer/steer_ocean.yaml's)")
    bs.add_argument("--coef", type=finite_float, default=4.0)
    bs.add_argument("--batch", type=positive_int, default=8)
    bs.add_argument("--new-tokens", type=positive_int, default=32)
    bs.add_argument("--repeats", type=positive_int, default=5)
    bs.add_argument("--json", default=None, help="also write the numbers to this file")
    bs.set_defaults(fn=cmd_bench_steer)
    bz = sub.add_parser("bench-erase", parents=[common], help="benchmark a text-to-image erasure: edit time, and images/s with "
                                           "the delta applied against the base pipeline")
    bz.add_argument("--spec", default="recipes/erase/erase_red.yaml", help="a `kind: erase` spec")
    bz.add_argument("--methods", nargs="+", default=None, help="some of uce, time, rece, esd-x, diff-quickfix "
                    "(default: the spec's)")
    bz.add_argument("--layer", type=int, default=0, help="the text-encoder layer of diff-quickfix when the spec has none")
    bz.add_argument("--images", type=positive_int, default=64)
    bz.add_argument("--repeats", type=positive_int, default=5)
    bz.add_argument("--device", type=device_flag, default="cpu")
    bz.add_argument("--json", default=None, help="also write the numbers to this file")
    bz.set_defaults(fn=cmd_bench_erase)
    at = sub.add_parser("attribution-steps", parents=[common], help="attribution (steps 1, 2, 4, 8) against exact "
                                                                   "tracing on facts no recipe uses: Pearson r and time")
    at.add_argument("--out", required=True)
    at.add_argument("--model", default="smollm2-135m")
    at.add_argument("--samples", type=positive_int, default=10)
    at.add_argument("--seed", type=natural_int, default=0)
    at.set_defaults(fn=cmd_attribution_steps)
    tf = sub.add_parser("trace-flags", parents=[common], help="VLM testbed: trace a capital fact with the country as an image and "
                                            "as text, side by side")
    tf.add_argument("--out", required=True)
    tf.add_argument("--countries", nargs="+", default=["France", "Germany", "Japan", "Korea"])
    tf.add_argument("--samples", type=positive_int, default=5)
    tf.add_argument("--seed", type=natural_int, default=2_000_000)
    tf.set_defaults(fn=cmd_trace_flags)
    ef = sub.add_parser("edit-flag", parents=[common], help="VLM testbed: ROME edit read at the image tokens of one flag")
    ef.add_argument("--out", required=True)
    ef.add_argument("--country", default="France")
    ef.add_argument("--target", default="Rome")
    ef.add_argument("--layer", type=natural_int, default=4)
    ef.add_argument("--mom2-tokens", type=positive_int, default=20_000)
    ef.add_argument("--seed", type=natural_int, default=3_000_000)
    ef.add_argument("--renders", type=positive_int, default=1, metavar="N",
                    help="read k* and optimise v* over N jittered renders of the flag (ROME's context templates, for images)")
    ef.add_argument("--kl-factor", type=finite_float, default=1.0,
                    help="weight of v*'s KL term on the naming prompt (ROME's default 0.0625 lets the flag's identity drift)")
    ef.add_argument("--image-stats", type=natural_int, default=0, metavar="N",
                    help="add the image-token key statistics of N jittered renders of every flag to C (0: text only)")
    ef.add_argument("--checkpoint", default=None, metavar="NAME", help="also ship the delta as checkpoints/NAME.safetensors")
    ef.set_defaults(fn=cmd_edit_flag)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    finished = False
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        status = args.fn(args)
        finished = True
        return status
    except LesionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (nothing half-written was left behind)", file=sys.stderr)
        return 130
    finally:
        dist = sys.modules.get("torch.distributed")   # only if this run imported it
        if dist is not None and dist.is_available() and dist.is_initialized():
            # after a finished run every process leaves together: one that tore its group down while rank 0
            # was still writing the result aborted once in gloo ("terminate called without an active
            # exception"); after an error nobody waits, so a process that failed alone cannot hang the others
            if finished:
                dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
