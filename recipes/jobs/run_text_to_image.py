"""Text-to-image jobs behind `lesion run`: trace, erase and apply on a diffusion pipeline.

    lesion run recipes/text-to-image/trace_shapes.yaml --out runs/trace_shapes
    lesion run recipes/erase/erase_red.yaml --out runs/erase_red
    lesion apply --model shapes-diffusion --delta runs/erase_red/delta.safetensors --prompt "a red circle"

Each writes its numbers as JSON and a Markdown table, and its pictures as PNG.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from editors.delta import applied, load_delta
from editors.methods.erase import erase
from interventions.core.atomic import atomic_write
from interventions.core.errors import SpecError
from interventions.core.plot import diffusion_trace_heatmap, image_grid, save_images
from interventions.modalities.text_to_image.pipeline import DiffusionPipe, load_pipeline
from interventions.testbeds.shapes import COLOURS, SHAPES, caption


def pipeline_for(spec, device="cpu") -> DiffusionPipe:
    return load_pipeline(spec.model, device=device, steps=spec.steps, guidance=spec.guidance)


# ------------------------------------------------------------------------- trace
def run_trace(spec, pipe: DiffusionPipe, out: Path) -> dict:
    from interventions.modalities.text_to_image.trace import trace

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
def world_of(pipe: DiffusionPipe):
    """The testbed's world module (its evaluator's words and its prompt sets), or None."""
    from interventions.modalities.text_to_image.pipeline import SCENES, TESTBED
    from interventions.testbeds import scenes, shapes

    return {TESTBED: shapes, SCENES: scenes}.get(pipe.name)


def shown(evaluator, images: torch.Tensor, words: list[str]) -> torch.Tensor:
    """Bool per image (images: ``[..., 3, h, w]``): does it show any of `words`?"""
    flat = images.reshape(-1, *images.shape[-3:])
    hit = torch.zeros(len(flat), dtype=torch.bool)
    for w in words:
        hit |= evaluator.shows(flat, w)
    return hit


def rate(evaluator, images: torch.Tensor, words: list[str]) -> float:
    return float(shown(evaluator, images, words).float().mean()) if images.numel() else float("nan")


def rate_asked(evaluator, images: torch.Tensor, asks: list[str | None], words: list[str]) -> float:
    """The share of images (``[prompts, images, 3, h, w]``) showing the erased concept their prompt asks
    for (`asks`, per prompt; None: any of `words`). With many concepts erased, an image for "a red
    circle" that now shows a blue circle shows *an* erased concept (circle) but not the one asked for."""
    hits = [shown(evaluator, imgs, words if w is None else [w]) for imgs, w in zip(images, asks)]
    return float(torch.cat(hits).float().mean()) if hits else float("nan")


def check_judged_concepts(spec, pipe: DiffusionPipe) -> None:
    """On a testbed every erased concept must be a word its evaluator names, or no rate is defined."""
    world = world_of(pipe)
    for i, c in enumerate(spec.concepts if world is not None else ()):
        if c.concept not in world.WORDS:
            raise SpecError(f"concepts[{i}].concept", c.concept, f"a word {pipe.name}'s image evaluator names: "
                            + ", ".join(world.WORDS))


def erase_prompt_sets(spec, pipe: DiffusionPipe) -> dict:
    """The prompts an erasure is judged on: the edit's templates, held-out phrasings, and per other
    concept the prompts that ask for it."""
    from editors.methods.erase import fill

    world = world_of(pipe)
    words = [c.concept for c in spec.concepts]
    pairs = [(fill(t, w), w) for t in spec.templates for w in words]
    templates = [p for p, _ in pairs]
    if spec.heldout:        # the user's own: which concept each asks for is not known, so any of them counts
        held = [(p, None) for p in spec.heldout]
    elif world:             # 12 per concept, at least 4 when many are erased
        n = max(4, 12 // len(words))
        held = list(zip(world.heldout_prompts(words, n, spec.seed), [w for w in words for _ in range(n)]))
    else:
        held = []
    seen = set(templates)
    held = [(p, w) for p, w in held if not (p in seen or seen.add(p))]           # each prompt once, in order
    heldout = [p for p, _ in held]
    vocabulary = world.WORDS if world else ()
    others = [w for w in vocabulary if w not in words]
    if spec.kept:
        kept = {w: [p for p in spec.kept if w in p.split()] for w in others}
    else:
        kept = {w: world.kept_prompts(w, 4, spec.seed + 1) for w in others} if world else {}
    return {"words": words, "templates": templates, "heldout": heldout, "kept": {w: p for w, p in kept.items() if p},
            # per judged prompt, the erased concept it asks for (None: any of them)
            "asks": [w for _, w in pairs] + [w for _, w in held]}


def adversarial_search(spec, pipe: DiffusionPipe, edited, prompts: list[str], base_images: torch.Tensor,
                       evaluator, asks: list[str]) -> tuple[torch.Tensor, list[dict]]:
    """Attack the first `spec.attack.prompts` template prompts of the edited model (inside `edited()`); its
    images ``[prompts, images, 3, h, w]`` (same seeds as every other set) and one record per attack."""
    from interventions.modalities.text_to_image.adversarial import attack, to_x0

    images, records = [], []
    seeds = [spec.seed + k for k in range(spec.images)]
    for k in range(min(spec.attack.prompts, len(prompts))):
        mine = base_images[k]
        keep = shown(evaluator, mine, [asks[k]])
        x0 = to_x0(pipe, mine[keep] if keep.any() else mine)      # the unedited model's images of the concept
        with edited():
            found = attack(pipe, prompts[k], x0, spec.attack, seed=spec.attack.seed + k)
            imgs = pipe.sample(found.context.expand(len(seeds), -1, -1), seeds)
        images.append(imgs)
        records.append({"prompt": prompts[k], "adversarial": found.text, "ids": found.ids, "tokens": found.tokens,
                        "loss_first": found.losses[0], "loss_last": found.losses[-1],
                        "concept": asks[k], "shown": rate(evaluator, imgs, [asks[k]])})
    empty = torch.zeros(0, spec.images, *base_images.shape[-3:])
    return (torch.stack(images) if images else empty), records


def judge_erasure(spec, pipe: DiffusionPipe, delta, edited=None) -> tuple[dict, dict]:
    """``(report fields, images)``: the erased concepts' rates on templates, held-out phrasings and under
    the adversarial search (after the edit, and before where it applies), and the other concepts' rates
    after / before (`kept_rate`: their mean ratio). `edited()`: a context in which the pipeline is the
    edited one (default: `delta` applied), e.g. a feature ablation in the text encoder."""
    edited = edited or (lambda: applied(pipe, delta))
    evaluator = pipe.meta.get("evaluator")
    sets = erase_prompt_sets(spec, pipe)
    words = sets["words"]
    if evaluator is None:
        return {"erased_rate": {"templates": None, "heldout": None, "adversarial": None}, "kept_rate": None,
                "note": "this pipeline has no image evaluator: rates need a testbed"}, {}
    check_judged_concepts(spec, pipe)
    kept_prompts = [p for ps in sets["kept"].values() for p in ps]
    prompts = sets["templates"] + sets["heldout"] + kept_prompts
    unique = list(dict.fromkeys(prompts))         # a prompt in two sets is generated once (same seeds)
    rows = torch.tensor([unique.index(p) for p in prompts])
    before = images_for(pipe, unique, spec.images, spec.seed)[rows]
    with edited():
        after = images_for(pipe, unique, spec.images, spec.seed)[rows]
    nt, nh = len(sets["templates"]), len(sets["heldout"])
    parts = {"templates": slice(0, nt), "heldout": slice(nt, nt + nh)}
    asks = sets["asks"]
    adv_images, attacks = adversarial_search(spec, pipe, edited, sets["templates"], before[:nt], evaluator, asks)
    erased = {k: rate_asked(evaluator, after[sl], asks[sl], words) if sl.stop > sl.start else None
              for k, sl in parts.items()}
    erased["adversarial"] = (rate_asked(evaluator, adv_images, [a["concept"] for a in attacks], words)
                             if attacks else None)
    before_rates = {k: rate_asked(evaluator, before[sl], asks[sl], words) if sl.stop > sl.start else None
                    for k, sl in parts.items()}
    kept, lo = {}, nt + nh
    for w, ps in sets["kept"].items():
        b, a = rate(evaluator, before[lo:lo + len(ps)], [w]), rate(evaluator, after[lo:lo + len(ps)], [w])
        kept[w] = {"before": b, "after": a, "prompts": len(ps)}
        lo += len(ps)
    ratios = [v["after"] / v["before"] for v in kept.values() if v["before"] > 0]
    fields = {"erased_rate": erased, "erased_rate_before": before_rates,
              "kept_rate": sum(ratios) / len(ratios) if ratios else None, "kept": kept,
              "adversarial": {"attacks": attacks, **spec.attack.model_dump(),
                              # UnlearnDiffAtk's attack success rate: attacked prompts whose images show the
                              # concept at least half the time
                              "success_rate": (sum(a["shown"] >= 0.5 for a in attacks) / len(attacks)
                                               if attacks else None)},
              "prompts": {k: sets[k] for k in ("templates", "heldout")}, "kept_prompts": sets["kept"]}
    return fields, {"before": before, "after": after, "adversarial": adv_images, "prompts": prompts,
                    "templates": nt, "heldout": nh}


def run_erase(spec, pipe: DiffusionPipe, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    delta = erase(spec, pipe)
    edit_seconds = time.perf_counter() - start
    report = {"edit_seconds": edit_seconds, "method": spec.method, "edit": spec.edit,
              "edited": delta.names, "rank": {n: int(f[0].shape[1]) for n, f in delta.factors.items()},
              "images_per_prompt": spec.images, "seeds_from": spec.seed, "steps": pipe.steps,
              "guidance": pipe.guidance}
    start = time.perf_counter()
    judged, images = judge_erasure(spec, pipe, delta)
    report.update(judged, judge_seconds=time.perf_counter() - start)
    evaluator = pipe.meta.get("evaluator")
    world = world_of(pipe)
    if images and world is not None:
        save_judged_images(images, evaluator, world.WORDS, spec.seed, out)
    grid = list(spec.prompts) or (default_prompts() if pipe.name == "shapes-diffusion" else [])
    if not grid and not images:          # no evaluator, so nothing judged: the grid shows the templates
        from editors.methods.erase import fill

        grid = [fill(t, c.concept) for t in spec.templates for c in spec.concepts][:8]
    if grid:
        before, after = grid_images(spec, pipe, delta, grid, images)
        image_grid([("before", before), ("after", after)], grid, out / "grid.png")
    else:
        judged_grid(images, out / "grid.png")
    if grid and evaluator is not None and pipe.name == "shapes-diffusion":
        tb, ta = score_table(evaluator, before, grid), score_table(evaluator, after, grid)
        report.update(before=tb, after=ta, summary=summarize(tb, ta, [c.concept for c in spec.concepts],
                                                             [c.guide for c in spec.concepts]))
        atomic_write(out / "table.md", markdown(tb, ta).encode())
    metrics = {"erased_" + k: v for k, v in report["erased_rate"].items() if v is not None}
    if report.get("kept_rate") is not None:
        metrics["kept_rate"] = report["kept_rate"]
    delta = delta.with_metrics({**report.get("summary", {}), **metrics})
    delta.save(out / "delta.safetensors")
    atomic_write(out / "report.json", json.dumps(report, indent=1).encode())
    return report


def save_judged_images(images: dict, evaluator, words: list[str], seed: int, out: Path) -> None:
    """Every judged image (images.safetensors: before, after, adversarial) and what the evaluator says each
    shows (images.json), for `lesion report`'s gallery."""
    nt, nh, prompts = images["templates"], images["heldout"], images["prompts"]
    sets = ["templates"] * nt + ["heldout"] * nh + ["kept"] * (len(prompts) - nt - nh)
    described, tensors = [], {}
    for phase in ("before", "after", "adversarial"):
        stack = images[phase]
        if not len(stack):
            continue
        flat = stack.reshape(-1, *stack.shape[-3:])
        tensors[phase] = flat
        shows = {w: evaluator.shows(flat, w) for w in words}
        n = stack.shape[1]
        for k in range(len(flat)):
            row = k // n
            described.append({"phase": phase, "index": k, "set": "adversarial" if phase == "adversarial" else sets[row],
                              "prompt": f"adversarial {row}" if phase == "adversarial" else prompts[row],
                              "seed": seed + k % n, "label": " ".join(w for w in words if bool(shows[w][k]))})
    save_images(tensors, out / "images.safetensors")
    atomic_write(out / "images.json", json.dumps({"judge": "the testbed's image evaluator: the words it says an "
                                                  "image shows", "images": described}, indent=1).encode())


def grid_images(spec, pipe: DiffusionPipe, delta, grid: list[str], judged: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Before and after images of the `grid` prompts, taken from the judged sets where they were
    generated there already (same seeds), the rest generated now."""
    index = {p: i for i, p in enumerate(judged.get("prompts", []))}
    missing = [p for p in dict.fromkeys(grid) if p not in index]
    if missing:
        more_before = images_for(pipe, missing, spec.images, spec.seed)
        with applied(pipe, delta):
            more_after = images_for(pipe, missing, spec.images, spec.seed)
    rows_b, rows_a = [], []
    for p in grid:
        if p in index:
            rows_b.append(judged["before"][index[p]])
            rows_a.append(judged["after"][index[p]])
        else:
            rows_b.append(more_before[missing.index(p)])
            rows_a.append(more_after[missing.index(p)])
    return torch.stack(rows_b), torch.stack(rows_a)


def judged_grid(images: dict, path: Path) -> None:
    """Before | after for two template, two held-out and two kept prompts of the judged sets, and (after
    only) the adversarial prompts' images."""
    if not images:
        return
    nt, nh = images["templates"], images["heldout"]
    rows = list(range(min(2, nt))) + list(range(nt, nt + min(2, nh))) + list(range(nt + nh, len(images["prompts"])))[:2]
    labels = [images["prompts"][r] for r in rows]
    before, after = images["before"][rows], images["after"][rows]
    adv = images["adversarial"]
    if len(adv):
        labels += [f"adversarial {k}" for k in range(len(adv))]
        before = torch.cat([before, torch.zeros_like(adv)])
        after = torch.cat([after, adv])
    image_grid([("before", before), ("after", after)], labels, path)


# ------------------------------------------------------------------------- apply
def apply_and_draw(spec, pipe: DiffusionPipe, out: Path | None) -> dict:
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


def trace_job(spec, args, out: Path) -> dict | None:
    pipe = pipeline_for(spec, device=args.device)
    report = run_trace(spec, pipe, out)
    result = report["result"]
    print(f"trace of {len(result.prompts)} prompt(s) on {spec.model}: {result.meta['images_per_cell']} images "
          f"per cell, {pipe.steps} steps, in {report['seconds']:.1f} s")
    for i, p in enumerate(result.prompts):
        print(f"  {p['prompt']!r} (corrupted: {p['corrupted_prompt']!r}) shows {p['target']!r}: "
              f"clean {p['clean_prob']:.2f}, corrupted {p['corrupted_prob']:.2f}")
        for name, grid in result.grids.items():
            vals = grid.values[i, :, :grid.lengths[i]]
            best = int(vals.nan_to_num(-1).argmax())
            layer, pos = divmod(best, vals.shape[1])
            where = (f"attn2 window from {grid.layers[layer]}" if name == "cross_attention"
                     else f"layer {grid.layers[layer]}, token {pos} {p['columns'][pos]!r}")
            print(f"    {name}: best {float(vals.flatten()[best]):.2f} at {where}")
    print(f"wrote {', '.join(report['written'])} to {args.out}")
    return None


def erase_job(spec, args, out: Path) -> dict | None:
    pipe = pipeline_for(spec, device=args.device)
    report = run_erase(spec, pipe, out)
    ranks = sorted(set(report["rank"].values()))
    print(f"{spec.method} ({spec.edit}) edit of {len(report['edited'])} projection(s) in "
          f"{report['edit_seconds']:.2f} s (rank {ranks or 'dense'})")

    def pct(v):
        return "n/a" if v is None else f"{v:.2f}"

    e, b = report["erased_rate"], report.get("erased_rate_before", {})
    print(f"  erased concept shown after (before): templates {pct(e['templates'])} ({pct(b.get('templates'))}), "
          f"held-out phrasings {pct(e['heldout'])} ({pct(b.get('heldout'))}), adversarial search "
          f"{pct(e['adversarial'])}; other concepts kept {pct(report['kept_rate'])}")
    if "summary" in report:
        s = report["summary"]
        print(f"  erased concept shown: {s['erased_before']:.2f} -> {s['erased_after']:.2f}; other colours "
              f"{s['other_colours_before']:.2f} -> {s['other_colours_after']:.2f}; other shapes "
              f"{s['other_shapes_before']:.2f} -> {s['other_shapes_after']:.2f}")
    images = ", images.safetensors, images.json" if (out / "images.json").is_file() else ""
    print(f"wrote delta.safetensors, grid.png, report.json{', table.md' if 'summary' in report else ''}{images} "
          f"to {args.out} (`lesion report {args.out}` for the interactive page)")
    metrics = {**report.get("summary", {}), **{f"erased_{k}": v for k, v in report["erased_rate"].items()},
               "kept_rate": report["kept_rate"]}
    return dict(method=spec.method, edit=spec.edit, edited=report["edited"], metrics=metrics)


def apply_job(spec, args, out: Path | None) -> dict | None:
    pipe = pipeline_for(spec, device=args.device)
    report = apply_and_draw(spec, pipe, out)
    print(f"{report['images']} images with and without {len(spec.deltas)} delta(s): "
          f"{report['base_seconds']:.2f} s base, {report['edited_seconds']:.2f} s edited")
    for prompt, row in (report.get("after") or {}).items():
        b = report["before"][prompt]
        asked = row["asked_colour"] + row["asked_shape"]
        print(f"  {prompt!r}: " + ", ".join(f"{w} {b[w]:.2f} -> {row[w]:.2f}" for w in asked))
    if out is not None:
        print(f"wrote grid.png, report.json to {args.out}")
    return None
