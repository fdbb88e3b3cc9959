"""Vision-language jobs behind `lesion run`: `kind: trace` on a LLaVA model.

    lesion run recipes/trace_flag_france.yaml --out runs/trace_flag_france

Writes result.json, result.safetensors, spec.yaml and heatmap.png (image positions marked ``*``),
as the language-model trace does.
"""

from __future__ import annotations

import time
from pathlib import Path

from interventions.result import Result
from interventions.vlm import load_image, load_vlm
from interventions.vlm_trace import VLMCase, vlm_trace


def run_trace(spec, out: Path, *, device: str = "cpu") -> tuple[Result, float]:
    vlm, tokenizer, processor = load_vlm(spec.model, device=device)
    cases = []
    for i, p in enumerate(spec.prompts):
        pixels = load_image(p.image, vlm, processor, field=f"prompts[{i}].image")
        other = None if p.counterfactual_image is None else load_image(
            p.counterfactual_image, vlm, processor, field=f"prompts[{i}].counterfactual_image")
        cases.append(VLMCase(pixels, p.prompt, p.target, counterfactual=other, label=p.image))
    start = time.perf_counter()
    grids, records = vlm_trace(vlm, tokenizer, cases, sites=spec.sites, corruption=spec.corruption,
                               noise=spec.noise, samples=spec.samples, seed=spec.seed, window=spec.window,
                               max_batch_rows=spec.max_batch_rows, sigma=spec.sigma)
    seconds = time.perf_counter() - start
    result = Result("trace", spec.model, spec, records, grids, {"seconds": round(seconds, 1)})
    result.save(out)
    return result, seconds


def run_apply(model: str, delta_paths: list[str], image: str, prompts: list[str], *, max_new_tokens: int = 8,
              device: str = "cpu") -> list[dict]:
    """Greedy answers to `prompts` about `image`, without and with the deltas (verified first, reverted after)."""
    import torch

    from editors.delta import applied, load_delta
    from interventions.vlm import image_prompt

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
