"""What `lesion run` does with a trace or patch spec on a language or vision-language model: the one batched
engine, then result.json, result.safetensors and a heatmap in `--out`."""

from __future__ import annotations

import time
from pathlib import Path


def grid_job(spec, args, out: Path | None) -> dict | None:
    """`kind: trace` / `kind: patch` on a language model or a VLM: the one batched engine."""
    from interventions import run
    from interventions.api import engine_model, load_for
    from interventions.core.distributed import local_device, world
    from interventions.core.memory import PeakMemory
    from interventions.core.runtime import input_device
    from interventions.core.units import human, parse_bytes
    from recipes.jobs.flag_checks import parse_device_map

    memory = parse_bytes(args.memory, "--memory") if args.memory else None
    placement = dict(device=local_device(args.device), device_map=parse_device_map(args.device_map),
                     offload_folder=args.offload_folder)
    vision = spec.modality in ("vision-language", "contrastive")        # heatmaps over the image
    model, tokenizer, processor = load_for(spec.modality, spec.model, **placement)
    model, tokenizer = engine_model(spec, model, tokenizer)       # what the engine runs (a CLIP: its classifier)
    start = time.perf_counter()
    with PeakMemory(input_device(model), model=model) as peak:
        result = run(spec, model, tokenizer, processor=processor, max_batch_rows=args.max_batch_rows,
                     progress=not args.quiet, memory=memory)
    seconds = time.perf_counter() - start
    result.meta.update(memory_peak_bytes=peak.bytes, memory_peak_measured_by=peak.method, seconds=round(seconds, 1))
    if world()[0] != 0:
        return None
    written = result.save(out, heatmap=not vision)
    if vision:
        import torch

        from interventions.core.plot import save_images, vlm_trace_heatmap

        images = _images(spec, result, model, processor)
        vlm_trace_heatmap(result, images, out / "heatmap.png")
        written.append("heatmap.png")
        if images and all(i is not None and i.shape == images[0].shape for i in images):
            save_images({"prompt": torch.stack(images)}, out / "images.safetensors")    # for `lesion report`
            written.append("images.safetensors")
    budget = f" (budget {human(memory)})" if memory else ""
    print(f"{spec.kind} of {len(result.prompts)} prompt(s) on {spec.model}: {result.meta['rows']} rows "
          f"in {seconds:.1f} s; peak memory beyond the weights {human(peak.bytes)}{budget}")
    for p in result.prompts:
        label = f"{p['label']} + " if p.get("label") and p["label"] != p["prompt"] else ""
        line = f"  {label}{p['prompt']!r} -> {p['answer']!r}: clean p={p['clean_prob']:.3f}"
        if "corrupted_prob" in p:
            line += f", corrupted p={p['corrupted_prob']:.3f}"
        if "base_metric" in p:
            line += f", base {spec.metric}={p['base_metric']:.3f}"
        print(line)
    print(f"wrote {', '.join(written)} to {args.out}")
    return None


def _images(spec, result, model, processor) -> list:
    """The base image of each prompt, for the heatmap (None: a text-only VLM prompt)."""
    if spec.modality == "contrastive":
        from interventions.modalities.contrastive.inputs import load_image

        return [load_image(p["label"], model.config.image_size, processor) for p in result.prompts]
    from recipes.jobs.run_vision_language import images_of

    return images_of(result, model, processor)
