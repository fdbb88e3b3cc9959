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
