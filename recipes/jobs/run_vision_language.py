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
from interventions.spec.kinds import VLMTracePrompt, VLMTraceSpec
from interventions.modalities.vision_language.llava import load_image, load_vlm


def images_of(result: Result, vlm, processor=None) -> list[torch.Tensor | None]:
    """The base image of each prompt of a VLM result, for its heatmap (None: a text-only prompt)."""
    return [load_image(p["label"], vlm, processor) if p.get("label") else None for p in result.prompts]


def run_apply(model: str, delta_paths: list[str], image: str, prompts: list[str], *, max_new_tokens: int = 8,
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


def locate_layer(spec, vlm, tokenizer, processor=None) -> tuple[int, Result]:
    """`layer: auto`: the MLP window that restores p(`target_true`) most when every image token's
    MLP output is restored at once, under image noise, averaged over the edit questions."""
    how = spec.locate
    trace_spec = VLMTraceSpec(model=spec.model, corruption="noise", noise=how.noise, samples=how.samples,
                              seed=how.seed, sites=("mlp",), window=how.window, image_cells="block",
                              prompts=tuple(VLMTracePrompt(image=spec.image, prompt=q, target=spec.target_true)
                                            for q in spec.questions))
    from interventions import run

    result = run(trace_spec, vlm, tokenizer, processor=processor)
    grid = result.grids["mlp"].values
    effect = torch.stack([grid[i, :, r["image_column"]] for i, r in enumerate(result.prompts)]).mean(0)
    result.meta["effect"] = effect.tolist()
    return int(effect.argmax()), result


def run_edit(spec, out: Path, *, device: str = "cpu") -> dict:
    """`kind: edit` on a VLM: ROME with the key at the image tokens (`editors.methods.rome_vision_language`).

    Writes delta.safetensors (its metrics inside), report.json and table.md; returns the report.
    Efficacy: the questions about `image` answer `target_new` (top-1); generalisation: the
    paraphrases do; specificity: the other images keep their top-1 answer to every question."""
    from editors.delta import applied
    from editors.methods.rome_vision_language import compute_vlm_rome, image_key_moment
    from interventions.core.atomic import atomic_write
    from interventions.core.errors import SpecError
    from interventions.models.sites import LLAVA
    from interventions.spec.kinds import spec_to_dict
    from interventions.modalities.vision_language.llava import load_images, top_answers
    from editors.editor import key_statistics, hyperparameters

    out = Path(out)
    vlm, tokenizer, processor = load_vlm(spec.model, device=device)
    pixels = load_image(spec.image, vlm, processor, field="image")
    others = [load_image(ref, vlm, processor, field=f"other_images[{i}]") for i, ref in enumerate(spec.other_images)]
    seconds, located = {}, None
    start = time.perf_counter()
    if spec.layer == "auto":
        layer, trace = locate_layer(spec, vlm, tokenizer, processor)
        trace.save(out / "locate", heatmap=False)
        located = {"layer": layer, "effect": trace.meta["effect"], "window": spec.locate.window}
        spec = spec.model_copy(update={"layer": layer})
        seconds["locate"] = time.perf_counter() - start
    n_layers = LLAVA.num_layers(vlm)
    if spec.layer >= n_layers:
        raise SpecError("layer", spec.layer, f"a layer in [0, {n_layers - 1}] (the language model has {n_layers})")
    hp = hyperparameters(spec)
    start = time.perf_counter()
    C = key_statistics(spec, vlm, tokenizer, [spec.layer])[spec.layer]
    seconds["statistics"] = time.perf_counter() - start
    image_keys = n_images = 0
    if spec.image_corpus:
        start = time.perf_counter()
        corpus = [px for i, ref in enumerate(spec.image_corpus)
                  for px in load_images(ref, vlm, processor, field=f"image_corpus[{i}]")]
        n_images = len(corpus)
        C_images, image_keys = image_key_moment(vlm, tokenizer, torch.stack(corpus), spec.layer)
        C = C + spec.image_corpus_weight * C_images.to(C.device, C.dtype)
        seconds["image statistics"] = time.perf_counter() - start
    start = time.perf_counter()
    delta, info = compute_vlm_rome(vlm, tokenizer, pixels, list(spec.questions), spec.target_new, layer=spec.layer,
                                   C=C, base_model=spec.model, hp=hp, kl_question=spec.kl_prompt,
                                   spec=spec_to_dict(spec))
    seconds["edit"] = time.perf_counter() - start
    questions = list(spec.questions) + list(spec.paraphrases)
    stack = torch.stack(others) if others else None

    def measure() -> dict:
        own = {q: top_answers(vlm, tokenizer, pixels[None], q)[0] for q in questions}
        rest = {q: top_answers(vlm, tokenizer, stack, q) for q in questions} if stack is not None else {}
        return {"answers": own, "other_images": rest,
                "kl_prompt_answer": top_answers(vlm, tokenizer, pixels[None], spec.kl_prompt)[0]}

    before = measure()
    with applied(vlm, delta):
        after = measure()
    new = spec.target_new.strip()

    def share(which, qs):
        return sum(which["answers"][q] == new for q in qs) / len(qs) if qs else None

    metrics = {"efficacy": share(after, spec.questions), "efficacy_before": share(before, spec.questions),
               "generalisation": share(after, spec.paraphrases),
               "generalisation_before": share(before, spec.paraphrases),
               "specificity": (sum(a == b for q in questions for a, b in zip(before["other_images"][q],
                                                                              after["other_images"][q]))
                               / (len(questions) * len(others))) if others else None,
               # does the image still read as what it was (e.g. its name after "This is the flag of")?
               "kl_prompt_kept": float(before["kl_prompt_answer"] == after["kl_prompt_answer"])}
    path = out / "delta.safetensors"
    delta.with_metrics({k: v for k, v in metrics.items() if v is not None}).save(path)
    report = {"model": spec.model, "image": spec.image, "layer": spec.layer, "located": located,
              "target_new": spec.target_new, "target_true": spec.target_true, "metrics": metrics,
              "before": before, "after": after, "seconds": seconds, "v_star_steps": len(info["history"]),
              "final_nll": info["history"][-1]["nll"], "delta": path.name, "bytes": path.stat().st_size,
              "edited": delta.names,
              "image_corpus": {"images": n_images, "keys": image_keys, "weight": spec.image_corpus_weight}}
    atomic_write(out / "report.json", json.dumps(report, indent=1).encode())
    atomic_write(out / "table.md", table(report, spec).encode())
    return report


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
