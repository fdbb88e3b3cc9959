"""Text-to-image jobs behind `lesion run`: trace, erase and apply on a diffusion pipeline.

    lesion run recipes/trace_shapes.yaml --out runs/trace_shapes
    lesion run recipes/erase_red.yaml --out runs/erase_red
    lesion apply --model shapes-diffusion --delta runs/erase_red/delta.safetensors --prompt "a red circle"

Each writes its numbers as JSON and a Markdown table, and its pictures as PNG.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from editors.delta import applied, load_delta
from editors.erase import erase
from interventions.atomic import atomic_write
from interventions.diffusion import DiffusionPipe, load_pipeline
from interventions.plot import diffusion_trace_heatmap, image_grid
from interventions.shapes import COLOURS, SHAPES, caption


def pipeline_for(spec, device="cpu") -> DiffusionPipe:
    return load_pipeline(spec.model, device=device, steps=spec.steps, guidance=spec.guidance)


# ------------------------------------------------------------------------- trace
def run_trace(spec, pipe: DiffusionPipe, out: Path) -> dict:
    from interventions.diffusion_trace import trace

    start = time.perf_counter()
    result = trace(spec, pipe)
    seconds = time.perf_counter() - start
    result.meta["seconds"] = round(seconds, 1)
    written = result.save(out, heatmap=False)
    diffusion_trace_heatmap(result, out / "heatmap.png")
    return {"result": result, "seconds": seconds, "written": written + ["heatmap.png"]}


# ------------------------------------------------------------------------- evaluation
def default_prompts() -> list[str]:
    return [caption(c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES))]


def words_of(prompt: str, vocabulary) -> list[str]:
    return [w for w in prompt.split() if w in vocabulary]


def images_for(pipe: DiffusionPipe, prompts: list[str], n: int, seed: int) -> torch.Tensor:
    """``Float[Tensor, "prompts n 3 h w"]``: the same seeds (seed..seed+n-1) for every prompt."""
    seeds = [seed + k for k in range(n)] * len(prompts)
    flat = pipe.generate([p for p in prompts for _ in range(n)], seeds)
    return flat.view(len(prompts), n, *flat.shape[1:])


def score_table(evaluator, images: torch.Tensor, prompts: list[str]) -> dict[str, dict]:
    """Per prompt: the share of images showing each colour and shape word of the prompt, and all colours."""
    table = {}
    for prompt, imgs in zip(prompts, images):
        colours, shapes = evaluator(imgs)
        row = {w: float((colours == COLOURS.index(w)).float().mean()) for w in COLOURS}
        row.update({w: float((shapes == SHAPES.index(w)).float().mean()) for w in SHAPES})
        row["asked_colour"] = words_of(prompt, COLOURS)
        row["asked_shape"] = words_of(prompt, SHAPES)
        table[prompt] = row
    return table


def summarize(before: dict, after: dict, concepts: list[str], guides: list[str]) -> dict:
    """The erased concept's rate where it was asked for, and the accuracy everywhere else, before/after."""
    def mean(rows):
        return sum(rows) / len(rows) if rows else float("nan")

    erased_b, erased_a, guide_a, other_c_b, other_c_a, shape_b, shape_a = [], [], [], [], [], [], []
    for prompt in before:
        asked = before[prompt]["asked_colour"] + before[prompt]["asked_shape"]
        hit = [w for w in asked if w in concepts]
        for w in hit:
            erased_b.append(before[prompt][w])
            erased_a.append(after[prompt][w])
        for g in guides:
            if hit and g:
                guide_a.append(after[prompt][g])
        for w in before[prompt]["asked_colour"]:
            if w not in concepts:
                other_c_b.append(before[prompt][w])
                other_c_a.append(after[prompt][w])
        if not hit:
            for w in before[prompt]["asked_shape"]:
                shape_b.append(before[prompt][w])
                shape_a.append(after[prompt][w])
    s = {"erased_before": mean(erased_b), "erased_after": mean(erased_a), "guide_after": mean(guide_a),
         "other_colours_before": mean(other_c_b), "other_colours_after": mean(other_c_a),
         "other_shapes_before": mean(shape_b), "other_shapes_after": mean(shape_a)}
    s["other_colours_kept"] = s["other_colours_after"] / s["other_colours_before"]
    s["other_shapes_kept"] = s["other_shapes_after"] / s["other_shapes_before"]
    return s


def markdown(before: dict, after: dict) -> str:
    lines = ["| prompt | asked | before | after | most shown after |", "|---|---|---|---|---|"]
    for prompt in before:
        for w in before[prompt]["asked_colour"] + before[prompt]["asked_shape"]:
            kind = COLOURS if w in COLOURS else SHAPES
            top = max(kind, key=lambda k: after[prompt][k])
            lines.append(f"| {prompt} | {w} | {before[prompt][w]:.2f} | {after[prompt][w]:.2f} | "
                         f"{top} {after[prompt][top]:.2f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------- erase
def run_erase(spec, pipe: DiffusionPipe, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    delta = erase(spec, pipe)
    edit_seconds = time.perf_counter() - start
    prompts = list(spec.prompts) or default_prompts()
    before = images_for(pipe, prompts, spec.images, spec.seed)
    with applied(pipe, delta):
        after = images_for(pipe, prompts, spec.images, spec.seed)
    report = {"edit_seconds": edit_seconds, "method": spec.method, "edit": spec.edit,
              "edited": delta.names, "rank": {n: int(f[0].shape[1]) for n, f in delta.factors.items()},
              "images_per_prompt": spec.images, "seeds_from": spec.seed, "steps": pipe.steps,
              "guidance": pipe.guidance}
    evaluator = pipe.meta.get("evaluator")
    if evaluator is not None:
        tb, ta = score_table(evaluator, before, prompts), score_table(evaluator, after, prompts)
        report.update(before=tb, after=ta, summary=summarize(tb, ta, [c.concept for c in spec.concepts],
                                                             [c.guide for c in spec.concepts]))
        atomic_write(out / "table.md", markdown(tb, ta).encode())
        delta = delta.with_metrics(report["summary"])
    delta.save(out / "delta.safetensors")
    image_grid([("before", before), ("after", after)], prompts, out / "grid.png")
    atomic_write(out / "report.json", json.dumps(report, indent=1).encode())
    return report


# ------------------------------------------------------------------------- apply
def run_apply(spec, pipe: DiffusionPipe, out: Path | None) -> dict:
    deltas = [load_delta(p) for p in spec.deltas]
    start = time.perf_counter()
    before = images_for(pipe, list(spec.prompts), spec.images, spec.seed)
    base_s = time.perf_counter() - start
    with applied(pipe, *deltas):          # verifies every delta against this pipeline first
        start = time.perf_counter()
        after = images_for(pipe, list(spec.prompts), spec.images, spec.seed)
        edited_s = time.perf_counter() - start
    report = {"deltas": list(spec.deltas), "images": len(spec.prompts) * spec.images,
              "base_seconds": base_s, "edited_seconds": edited_s}
    evaluator = pipe.meta.get("evaluator")
    if evaluator is not None:
        report["before"] = score_table(evaluator, before, list(spec.prompts))
        report["after"] = score_table(evaluator, after, list(spec.prompts))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        image_grid([("base", before), ("with " + " + ".join(Path(d).stem for d in spec.deltas), after)],
                   list(spec.prompts), out / "grid.png")
        atomic_write(out / "report.json", json.dumps(report, indent=1).encode())
    return report
