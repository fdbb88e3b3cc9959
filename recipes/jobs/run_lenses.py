"""`lesion run` for the lenses: `kind: lens`, `knockout`, `probe` (language models and VLMs) and `daam`
(text-to-image). Each writes its numbers (result.json / report.json), its tensors and one figure."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from interventions.core.atomic import atomic_save_file, atomic_write


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _load(spec, args):
    """The model, tokenizer and processor the spec's reading runs on (a CLIP model as its zero-shot classifier)."""
    from interventions.api import engine_model, load_for

    model, tokenizer, processor = load_for(spec.modality, spec.model, device=args.device)
    return (*engine_model(spec, model, tokenizer), processor)


def _grid_run(spec, args, out: Path, compute, figure, picture: str):
    """Load the model, run `compute` (a lens or knockout) timed, save its result and `figure` as `picture`:
    ``(result, names written)``."""
    model, tokenizer, processor = _load(spec, args)
    start = time.perf_counter()
    result = compute(spec, model, tokenizer, processor=processor, max_batch_rows=args.max_batch_rows)
    result.meta["seconds"] = round(time.perf_counter() - start, 1)
    written = result.save(out, heatmap=False)
    figure(result, out / picture)
    return result, written + [picture]


# ------------------------------------------------------------------------------------------ lens
def lens_figure(result, path: Path, *, max_prompts: int = 4) -> None:
    """p(target) per layer x position for each lens, the top-1 token written in each cell."""
    plt = _plt()
    names = [n for n in result.grids if not n.endswith("_rank")]
    prompts = result.prompts[:max_prompts]
    width = max(len(p["columns"]) for p in prompts)
    layers = result.grids[names[0]].layers
    fig, axes = plt.subplots(len(prompts), len(names), squeeze=False,
                             figsize=(1.0 * width * len(names) + 2, 0.26 * len(layers) * len(prompts) + 1.5))
    for i, rec in enumerate(prompts):
        for j, name in enumerate(names):
            ax = axes[i][j]
            n = len(rec["columns"])
            values = result.grids[name].values[i, :, :n].numpy()
            im = ax.imshow(values, aspect="auto", origin="lower", cmap="Purples", vmin=0, vmax=1)
            top = rec[f"{name}_top_k"]
            for k in range(len(layers)):
                for c in range(n):
                    ax.text(c, k, top[k][c][0][0].strip()[:7], ha="center", va="center", fontsize=5,
                            color="white" if values[k, c] > 0.5 else "black")
            ax.set_xticks(range(n), [str(t) for t in rec["columns"]], rotation=60, fontsize=6)
            ax.set_yticks(range(len(layers))[::2], [str(layer) for layer in layers][::2], fontsize=6)
            ax.set_title(f"{name}: p({rec['target']!r})", fontsize=8)
            ax.set_ylabel("layer", fontsize=7)
            fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def lens_job(spec, args, out: Path) -> None:
    from interventions.lenses.lens import run_lens as lens

    result, written = _grid_run(spec, args, out, lens, lens_figure, "lens.png")
    print(f"lens of {len(result.prompts)} prompt(s) on {spec.model}, {len(result.meta['layers'])} layers, in "
          f"{result.meta['seconds']} s")
    for p in result.prompts:
        line = f"  {p['prompt']!r} -> {p['target']!r} (p={p['clean_prob']:.3f}):"
        for name in (n for n in result.grids if not n.endswith("_rank")):
            if f"{name}_first_top1_layer" in p:
                line += (f" {name}: top-1 first at layer {p[f'{name}_first_top1_layer']}, from layer "
                         f"{p[f'{name}_settled_layer']} on;")
        print(line)
    print(f"wrote {', '.join(written)} to {args.out}")


# -------------------------------------------------------------------------------------- knockout
def knockout_figure(result, path: Path) -> None:
    """Relative change of p(answer) per layer (window centre) for each cut, one panel per prompt x target."""
    plt = _plt()
    panels = [(i, c) for i, p in enumerate(result.prompts) for c in range(len(p["columns"]))][:6]
    fig, axes = plt.subplots(1, len(panels), squeeze=False, figsize=(4.2 * len(panels), 3.2))
    for ax, (i, c) in zip(axes[0], panels):
        rec = result.prompts[i]
        for name, grid in result.grids.items():
            change = (grid.values[i, :, c] / rec["clean_prob"] - 1) * 100
            ax.plot(grid.layers, change.numpy(), marker=".", label=f"{name} -> {rec['columns'][c]}")
        ax.axhline(0, color="grey", lw=0.6)
        label = rec.get("image") or ""
        ax.set_title(f"{label} {rec['prompt'][-40:]!r} -> {rec['target']!r}", fontsize=7)
        ax.set_xlabel(f"layer (window {result.meta['window']})", fontsize=7)
        ax.set_ylabel("% change in p(answer)", fontsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def knockout_job(spec, args, out: Path) -> None:
    from interventions.lenses.knockout import run_knockout as knockout

    result, written = _grid_run(spec, args, out, knockout, knockout_figure, "knockout.png")
    print(f"knockout of {len(result.prompts)} prompt(s) on {spec.model}: {result.meta['rows']} rows in "
          f"{result.meta['seconds']} s (window {spec.window})")
    for i, p in enumerate(result.prompts):
        print(f"  {p.get('image', '') or ''}{p['prompt']!r} -> {p['target']!r}: p={p['clean_prob']:.3f}")
        for name, grid in result.grids.items():
            for c, col in enumerate(p["columns"]):
                change = (grid.values[i, :, c] / p["clean_prob"] - 1) * 100
                k = int(change.argmin())
                print(f"    {name} -> {col}: largest drop {float(change[k]):+.0f}% at layer {grid.layers[k]}")
    print(f"wrote {', '.join(written)} to {args.out}")


# ----------------------------------------------------------------------------------------- probe
def probe_figure(report: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    acc = torch.tensor(report["accuracy"])
    for c, pos in enumerate(report["positions"]):
        line = ax.plot(report["layers"], acc[:, c].numpy(), marker=".", label=f"accuracy at {pos}")
        if report["control_accuracy"] is not None:
            ctrl = torch.tensor(report["control_accuracy"])
            ax.plot(report["layers"], ctrl[:, c].numpy(), ls="--", color=line[0].get_color(),
                    label=f"control task at {pos}")
    ax.axhline(report["majority_baseline"], color="grey", lw=0.8, label="majority label")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"probe: {', '.join(report['labels'])} (split by {report['split']}: {report['train']} train, "
                 f"{report['test']} test)", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_probe(spec, model, tokenizer, processor, out: Path) -> dict:
    """Fit the probes and write report.json, spec.yaml, probe.png and one concept vector per label."""
    from interventions.lenses.probe import run_probe as probe
    from interventions.lenses.steering import FORMAT_VERSION, SteeringVector
    from interventions.spec import dump_spec
    from interventions.spec.lens_specs import concept_file

    start = time.perf_counter()
    fitted = probe(spec, model, tokenizer, processor)
    report = fitted["report"] | {"seconds": round(time.perf_counter() - start, 1), "model": spec.model}
    written = []
    for label, (layer, vector) in fitted["vectors"].items():
        name = concept_file(label)
        SteeringVector({layer: vector}, {
            "format_version": FORMAT_VERSION, "site": spec.site, "layers": [layer], "model": spec.model,
            "method": "probe", "label": label, "position": report["best"]["position"],
            "note": "a linear probe's direction for this label (TCAV), scaled to the distance between the label's "
                    "mean state and the others'"}).save(out / name)
        written.append(name)
    report["concept_vectors"] = written
    atomic_write(out / "report.json", json.dumps(report, indent=1).encode())
    atomic_write(out / "spec.yaml", dump_spec(spec).encode())
    probe_figure(report, out / "probe.png")
    return report


def probe_job(spec, args, out: Path) -> None:
    model, tokenizer, processor = _load(spec, args)
    report = write_probe(spec, model, tokenizer, processor, out)
    written = report["concept_vectors"]
    b = report["best"]
    print(f"probe of {len(spec.examples)} example(s) ({report['train']} train, {report['test']} held out, split by "
          f"{spec.split}) on {spec.model} in {report['seconds']} s; majority label {report['majority_baseline']:.2f}")
    print(f"  best: layer {b['layer']} at {b['position']}: accuracy {b['accuracy']:.2f}" +
          (f", control {b['control_accuracy']:.2f}" if b["control_accuracy"] is not None else ""))
    print(f"wrote report.json, spec.yaml, probe.png, {', '.join(written)} to {args.out}")


# ------------------------------------------------------------------------------------------ daam
def daam_figure(images: list[torch.Tensor], maps: list[dict], prompts: list[str], path: Path, *, per_prompt: int = 1):
    plt = _plt()
    rows = [(i, k) for i in range(len(prompts)) for k in range(min(per_prompt, len(images[i])))]
    cols = 1 + max(len(m) for m in maps)
    fig, axes = plt.subplots(len(rows), cols, squeeze=False, figsize=(1.6 * cols, 1.6 * len(rows)))
    for r, (i, k) in enumerate(rows):
        image = images[i][k].permute(1, 2, 0).numpy()
        axes[r][0].imshow(image, interpolation="nearest")
        axes[r][0].set_title(prompts[i], fontsize=6)
        for j, (word, m) in enumerate(maps[i].items(), start=1):
            axes[r][j].imshow(image, interpolation="nearest")
            axes[r][j].imshow(m[k].numpy(), cmap="jet", alpha=0.55, vmin=0, vmax=1, interpolation="bilinear")
            axes[r][j].set_title(word, fontsize=6)
        for ax in axes[r]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def daam_job(spec, args, out: Path) -> None:
    from interventions.modalities.text_to_image.daam import iou, outline, word_maps
    from interventions.modalities.text_to_image.pipeline import TESTBED
    from interventions.spec import dump_spec
    from interventions.testbeds.shapes import BRIGHT, COLOURS, SHAPES
    from recipes.jobs.run_text_to_image import pipeline_for

    pipe = pipeline_for(spec, device=args.device)
    layers = None if spec.layers == "all" else list(spec.layers)
    start = time.perf_counter()
    all_images, all_maps, rows, tensors = [], [], [], {}
    seeds = [spec.seed + j for j in range(spec.images)]
    for i, prompt in enumerate(spec.prompts):
        words = list(spec.words) or prompt.split()
        images, maps = word_maps(pipe, prompt, words, seeds, steps=spec.steps, guidance=spec.guidance, layers=layers,
                                 field=f"words (prompts[{i}])")
        all_images.append(images.cpu())
        all_maps.append({w: m.cpu() for w, m in maps.items()})
        row = {"prompt": prompt, "words": words}
        if spec.model == TESTBED:
            truth = images.max(1).values > BRIGHT        # the evaluator's bright pixels: the object
            row["iou"] = {w: float(iou(m > spec.threshold, truth.to(m.device)).mean()) for w, m in maps.items()}
            edge = outline(truth).to(images.device)
            row["iou_outline"] = {w: float(iou(m > spec.threshold, edge).mean()) for w, m in maps.items()}
        rows.append(row)
        for w, m in maps.items():
            tensors[f"{i}.{w}"] = m.contiguous().cpu()
    seconds = time.perf_counter() - start
    report = {"model": spec.model, "threshold": spec.threshold, "layers": spec.layers, "images_per_prompt": spec.images,
              "seconds": round(seconds, 1), "prompts": rows}
    if spec.model == TESTBED:
        def mean(kind, key="iou"):
            vals = [v for r in rows for w, v in r[key].items() if w in kind]
            return sum(vals) / len(vals) if vals else None
        others = [w for r in rows for w in r["words"] if w not in SHAPES + COLOURS]
        for key in ("iou", "iou_outline"):
            report[f"mean_{key}"] = {"shape_word": mean(SHAPES, key), "colour_word": mean(COLOURS, key),
                                     "other_words": mean(others, key)}
        report["truth"] = (f"the object's mask: pixels whose largest channel exceeds {BRIGHT} (the evaluator's rule); "
                           "outline: the 1-pixel band on either side of its edge")
    atomic_write(out / "report.json", json.dumps(report, indent=1).encode())
    atomic_write(out / "spec.yaml", dump_spec(spec).encode())
    atomic_save_file(tensors, out / "maps.safetensors", {"axes": json.dumps(["image", "height", "width"])})
    daam_figure(all_images, all_maps, list(spec.prompts), out / "daam.png")
    print(f"daam of {len(spec.prompts)} prompt(s) x {spec.images} image(s) on {spec.model} in {seconds:.1f} s")
    if "mean_iou" in report:
        m = report["mean_iou"]
        print(f"  mean IoU with the object's mask (maps > {spec.threshold}): shape word {m['shape_word']:.2f}, "
              f"colour word {m['colour_word']:.2f}" + (f", other words {m['other_words']:.2f}"
                                                       if m["other_words"] is not None else ""))
        m = report["mean_iou_outline"]
        print(f"  mean IoU with the object's outline: shape word {m['shape_word']:.2f}, colour word "
              f"{m['colour_word']:.2f}")
    print(f"wrote report.json, spec.yaml, maps.safetensors, daam.png to {args.out}")
