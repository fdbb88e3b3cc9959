"""`lesion export`: deltas as LoRA weights that serving libraries load (PEFT, diffusers, llama.cpp GGUF), or a merged model folder."""

from __future__ import annotations

from pathlib import Path

from interventions.core.atomic import check_out, check_out_file
from interventions.core.errors import SpecError
from recipes.jobs.flag_checks import model_for


def add_parser(sub, parents) -> None:
    x = sub.add_parser("export", parents=parents, help="write deltas as LoRA weights that serving libraries load "
                                                        "(PEFT: vLLM, TGI, PeftModel; diffusers)")
    x.add_argument("delta", nargs="+", help="delta files (several export as one adapter), or one steering vector")
    x.add_argument("--to", default=None, choices=("peft", "diffusers", "gguf"),
                   help="peft: a PEFT LoRA adapter (language and vision-language models); diffusers: LoRA weights for "
                        "StableDiffusionPipeline.load_lora_weights (text-to-image deltas); gguf: a llama.cpp "
                        "LoRA adapter (deltas) or control vector (a steering vector file)")
    x.add_argument("--out", required=True, help="the adapter folder to write")
    x.add_argument("--model", default=None, help="the base model (default: the delta's own base_model)")
    x.add_argument("--merged", action="store_true", help="instead of --to: the whole edited model as a Hugging Face "
                                                         "folder, for engines that take merged weights")
    x.add_argument("--each", action="store_true", help="one named adapter per delta (OUT/<file name>/) instead of "
                                                       "one adapter adding them all")
    x.set_defaults(fn=main)


def main(args) -> int:
    """`lesion export DELTA [DELTA ...] --to peft|diffusers --out DIR` (one PEFT LoRA adapter folder, or
    diffusers LoRA weights), or `--merged` (the edited model as a Hugging Face folder)."""
    from editors.delta import load_delta
    from interventions.models.families import is_text_to_image

    if args.to == "gguf":       # one file, not a folder
        out = check_out_file(args.out, "the GGUF file", ".gguf")
    else:
        out = check_out(args.out, True, "the adapter")
    if (args.to is None) == (not args.merged):
        raise SpecError("--to", args.to, "one of 'peft', 'diffusers', 'gguf', or --merged instead of --to "
                                         "(not both)")
    if args.to == "gguf":
        return _export_gguf(args, out)
    deltas = [load_delta(p) for p in args.delta]
    name = args.model or deltas[0].meta.get("base_model")
    if args.merged:
        if is_text_to_image(name) or args.each:
            raise SpecError("--merged", True, "a language-model or vision-language delta, without --each "
                            f"(got {'a text-to-image base' if is_text_to_image(name) else '--each'})")
        return _export_merged(name, deltas, out)
    if args.to == "diffusers" and not is_text_to_image(name):
        raise SpecError("--to", args.to, f"'peft' or 'gguf' for a language-model or vision-language delta (its base "
                        f"is {name!r})")
    if is_text_to_image(name):
        return _export_text_to_image(args, name, deltas, out)
    return _export_language(args, name, deltas, out)


def _export_merged(name: str, deltas: list, out: Path) -> int:
    from editors.export import export_merged

    model, tokenizer = model_for(name)
    export_merged(model, tokenizer, deltas, out)
    print(f"wrote {name} with {len(deltas)} delta(s) merged to {out} (a Hugging Face folder; config.json "
          "readable by transformers 4.x and 5.x)")
    return 0


def _export_text_to_image(args, name: str, deltas: list, out: Path) -> int:
    from editors.export import export_diffusers, export_peft
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


def _export_language(args, name: str, deltas: list, out: Path) -> int:
    """A language-model or vision-language delta as one PEFT adapter, or with `--each` one named adapter per delta."""
    from editors.export import export_peft
    from interventions.core.atomic import atomic_folder

    model, _ = model_for(name)
    if not args.each:
        export_peft(model, deltas, out, base_model=name)
        print(f"wrote a PEFT LoRA adapter of {len(deltas)} delta(s) on {name} to {out} "
              "(adapter_config.json, adapter_model.safetensors)")
        return 0
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
    from interventions.core.reading import existing_file
    from interventions.lenses.steering import META_KEY as STEER_KEY
    from interventions.lenses.steering import load_vector

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
            model, _ = model_for(args.model or vector.meta.get("model"))
            export_control_vector(vector, model, out)
            print(f"wrote a llama.cpp control vector (layers {vector.layers}, unscaled) to {out}; llama.cpp: "
                  f"--control-vector-scaled {out} COEF")
            return 0
    deltas = [load_delta(p) for p in args.delta]
    model, _ = model_for(args.model or deltas[0].meta.get("base_model"))
    export_gguf_lora(model, deltas, out)
    print(f"wrote a llama.cpp LoRA adapter of {len(deltas)} delta(s) to {out}; llama.cpp: --lora {out}")
    return 0
