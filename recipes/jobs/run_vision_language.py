"""Vision-language jobs behind `lesion run` and `lesion apply --image`: `kind: edit` on a LLaVA model
(ROME keyed at the image tokens, with `layer: auto` from an image-noise trace), greedy answers with
deltas applied, and the images a VLM trace's heatmap draws.

    lesion run recipes/vision-language/edit_flag_france.yaml --out runs/edit_flag_france [--checkpoint NAME]

VLM traces and patches (`lesion run recipes/vision-language/trace_flag_france.yaml`) run on the engine every grid
runs on (`recipes.cli.runners.run_grid`); their heatmap.png is `interventions.core.plot.vlm_trace_heatmap`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from interventions.engine.result import Result
from interventions.modalities.vision_language.llava import load_image, load_vlm


def images_of(result: Result, vlm, processor=None) -> list[torch.Tensor | None]:
    """The base image of each prompt of a VLM result, for its heatmap (None: a text-only prompt)."""
    return [load_image(p["label"], vlm, processor) if p.get("label") else None for p in result.prompts]


def apply_and_answer(model: str, delta_paths: list[str], image: str, prompts: list[str], *, max_new_tokens: int = 8,
              device: str = "cpu") -> list[dict]:
    """Greedy answers to `prompts` about `image`, without and with the deltas (verified first, reverted after)."""
    from editors.delta import applied, load_delta
    from interventions.modalities.vision_language.llava import image_prompt

    vlm, tokenizer, processor = load_vlm(model, device=device)
    deltas = [load_delta(p) for p in delta_paths]
    pixels = load_image(image, vlm, processor, field="--image")[None].to(device)

    def generate():
        out = []
        for p in prompts:
            ids = torch.tensor([image_prompt(tokenizer, vlm, p)], device=device)
            gen = vlm.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                               max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return out

    base = generate()
    with applied(vlm, *deltas):
        edited = generate()
    return [{"prompt": p, "base": b, "edited": e} for p, b, e in zip(prompts, base, edited)]


def run_edit(spec, out: Path, *, device: str = "cpu") -> dict:
    """`kind: edit` on a VLM: ROME with the key at the image tokens (`editors.methods.rome_vision_language`).

    Writes delta.safetensors (its metrics inside), report.json and table.md; returns the report.
    Efficacy: the questions about `image` answer `target_new` (top-1); generalisation: the
    paraphrases do; specificity: the other images keep their top-1 answer to every question."""
    from editors.delta import applied
    from editors.editor import hyperparameters
    from editors.evaluate import image_answers, image_edit_metrics
    from editors.methods.rome_vision_language import compute_vlm_rome
    from interventions.core.atomic import atomic_write
    from interventions.spec import spec_to_dict

    out = Path(out)
    vlm, tokenizer, processor = load_vlm(spec.model, device=device)
    pixels = load_image(spec.image, vlm, processor, field="image")
    others = [load_image(ref, vlm, processor, field=f"other_images[{i}]") for i, ref in enumerate(spec.other_images)]
    seconds = {}
    spec, located = _resolve_layer(spec, vlm, tokenizer, processor, out, seconds)
    C, corpus = _key_statistics(spec, vlm, tokenizer, processor, seconds)
    start = time.perf_counter()
    delta, info = compute_vlm_rome(vlm, tokenizer, pixels, list(spec.questions), spec.target_new, layer=spec.layer,
                                   C=C, base_model=spec.model, hp=hyperparameters(spec), kl_question=spec.kl_prompt,
                                   spec=spec_to_dict(spec))
    seconds["edit"] = time.perf_counter() - start
    questions = list(spec.questions) + list(spec.paraphrases)
    stack = torch.stack(others) if others else None
    before = image_answers(vlm, tokenizer, pixels, stack, questions, spec.kl_prompt)
    with applied(vlm, delta):
        after = image_answers(vlm, tokenizer, pixels, stack, questions, spec.kl_prompt)
    metrics = image_edit_metrics(spec, before, after, len(others))
    path = out / "delta.safetensors"
    delta.with_metrics({k: v for k, v in metrics.items() if v is not None}).save(path)
    report = {"model": spec.model, "image": spec.image, "layer": spec.layer, "located": located,
              "target_new": spec.target_new, "target_true": spec.target_true, "metrics": metrics,
              "before": before, "after": after, "seconds": seconds, "v_star_steps": len(info["history"]),
              "final_nll": info["history"][-1]["nll"], "delta": path.name, "bytes": path.stat().st_size,
              "edited": delta.names, "image_corpus": {**corpus, "weight": spec.image_corpus_weight}}
    atomic_write(out / "report.json", json.dumps(report, indent=1).encode())
    atomic_write(out / "table.md", table(report, spec).encode())
    return report


def _resolve_layer(spec, vlm, tokenizer, processor, out: Path, seconds: dict):
    """`layer: auto` replaced by the traced layer (its trace saved under out/locate); the layer checked."""
    from editors.locate import locate_image_layer
    from interventions.core.errors import SpecError
    from interventions.models.sites import LLAVA

    located = None
    if spec.layer == "auto":
        start = time.perf_counter()
        layer, trace = locate_image_layer(spec, vlm, tokenizer, processor)
        trace.save(out / "locate", heatmap=False)
        located = {"layer": layer, "effect": trace.meta["effect"], "window": spec.locate.window}
        spec = spec.model_copy(update={"layer": layer})
        seconds["locate"] = time.perf_counter() - start
    n_layers = LLAVA.num_layers(vlm)
    if spec.layer >= n_layers:
        raise SpecError("layer", spec.layer, f"a layer in [0, {n_layers - 1}] (the language model has {n_layers})")
    return spec, located


def _key_statistics(spec, vlm, tokenizer, processor, seconds: dict):
    """C at the edit layer: the text keys' second moment, plus `image_corpus_weight` x the image-token keys'
    of `image_corpus` when given; and what the image corpus held."""
    from editors.editor import key_statistics
    from editors.methods.rome_vision_language import image_key_moment
    from interventions.modalities.vision_language.llava import load_images

    start = time.perf_counter()
    C = key_statistics(spec, vlm, tokenizer, [spec.layer])[spec.layer]
    seconds["statistics"] = time.perf_counter() - start
    if not spec.image_corpus:
        return C, {"images": 0, "keys": 0}
    start = time.perf_counter()
    corpus = [px for i, ref in enumerate(spec.image_corpus)
              for px in load_images(ref, vlm, processor, field=f"image_corpus[{i}]")]
    C_images, image_keys = image_key_moment(vlm, tokenizer, torch.stack(corpus), spec.layer)
    seconds["image statistics"] = time.perf_counter() - start
    return C + spec.image_corpus_weight * C_images.to(C.device, C.dtype), {"images": len(corpus), "keys": image_keys}


def table(report: dict, spec) -> str:
    """The edit's answers before and after, per question, and the metrics, as Markdown."""
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"      # noqa: E731
    stats = "C from text" + (f" + {spec.image_corpus_weight:g} × the image-token keys of "
                             f"{report['image_corpus']['images']} images" if spec.image_corpus else "")
    lines = [f"ROME at layer {report['layer']} of {spec.model}, key at the image tokens of {spec.image}: "
             f"-> {spec.target_new!r} ({stats})", "", "| question | role | before | after |", "|---|---|---|---|"]
    for q in list(spec.questions) + list(spec.paraphrases):
        role = "edit" if q in spec.questions else "paraphrase"
        lines.append(f"| {q.strip()!r} | {role} | {report['before']['answers'][q]} | {report['after']['answers'][q]} |")
    m = report["metrics"]
    lines += ["", "| metric | before | after |", "|---|---|---|",
              f"| efficacy (questions answer {spec.target_new!r}) | {fmt(m['efficacy_before'])} | {fmt(m['efficacy'])} |",
              f"| generalisation (paraphrases) | {fmt(m['generalisation_before'])} | {fmt(m['generalisation'])} |",
              f"| specificity ({len(spec.other_images)} other images keep their answers) | 1.00 | "
              f"{fmt(m['specificity'])} |",
              f"| top-1 after {spec.kl_prompt.strip()!r} for the edited image kept "
              f"({report['before']['kl_prompt_answer']} → {report['after']['kl_prompt_answer']}) | 1.00 | "
              f"{fmt(m['kl_prompt_kept'])} |"]
    return "\n".join(lines) + "\n"


def edit_job(spec, args, out: Path) -> dict | None:
    """`kind: edit` on a LLaVA model: ROME keyed at the image tokens (recipes/jobs/run_vision_language.py)."""
    start = time.perf_counter()
    report = run_edit(spec, out, device=args.device)
    print(f"rome edit of {spec.image} at layer {report['layer']} of {spec.model} in "
          f"{time.perf_counter() - start:.1f} s: {Path(args.out) / report['delta']} ({report['bytes']} bytes)")
    print("  " + ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items()))
    print((out / "table.md").read_text(), end="")
    return dict(method="rome-vlm", edited=report["edited"], layer=report["layer"], metrics=report["metrics"],
                located=report["located"],
                note=f"key: mean over the image tokens of {spec.image}; C from {spec.mom2_tokens:,} tokens "
                     + ("of the spec's corpus files" if spec.corpus else "of text sampled from the model"))

