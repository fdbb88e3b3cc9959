"""One concept, red, followed through three kinds of model: the contrastive testbed's image tower, the flag VLM's
vision tower, and the scenes text-to-image testbed's text encoder. Each gets its own figure.

    python -m recipes.studies.red_three_models --out recipes/figures/red_three_models

1. **scenes-clip** (`recipes/contrastive/trace_red_clip.yaml` and `lens_colour_clip.yaml`): in the run on the same
   scene drawn in blue, where restoring the red scene's states (CLS, the patches) brings back the zero-shot "red"
   (causal), and from which layer CLS reads as red through the model's own post-norm and projection (decodable).
2. **llava-flags-deep-smollm2**: a linear probe per tower layer for "this flag has red in it", on the tower's
   patch-mean states of jittered renders, scored on flags (countries) it never saw (grouped cross-validation,
   scikit-learn), next to the same probe for "this flag has blue in it".
3. **scenes-smollm2** (`recipes/text-to-image/trace_red_scenes.yaml`): where in SmolLM2, as the UNet's text
   encoder, restoring "red" in the run on "a blue circle" makes the UNet draw red.

`results.json` holds every number the README quotes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from interventions.core.atomic import atomic_write
from interventions.core.paths import PROJECT, RECIPES

RED_CLIP = RECIPES / "contrastive/trace_red_clip.yaml"
LENS_CLIP = RECIPES / "contrastive/lens_colour_clip.yaml"
RED_SCENES = RECIPES / "text-to-image/trace_red_scenes.yaml"


def clip_part(out: Path) -> dict:
    """The contrastive testbed: the trace of red and the lens, one figure."""
    from interventions import load_spec, run
    from interventions.api import engine_model, load_for
    from interventions.core.plot import vlm_trace_heatmap
    from interventions.lenses.lens import run_lens
    from interventions.modalities.contrastive.inputs import load_image

    spec, lens_spec = load_spec(RED_CLIP), load_spec(LENS_CLIP)
    clip, tokenizer, processor = load_for("contrastive", spec.model)
    result = run(spec, clip, tokenizer)
    images = [load_image(p["label"], clip.config.vision_config.image_size) for p in result.prompts]
    vlm_trace_heatmap(result, images, out / "clip.png")
    model, names = engine_model(lens_spec, clip, tokenizer)
    lens = run_lens(lens_spec, model, names)
    report = {"trace": [], "lens": []}
    for i, rec in enumerate(result.prompts):
        hidden = result.grids["hidden"].values[i]
        block = rec["image_column"]
        low, high = rec["corrupted_prob"], rec["clean_prob"]
        def restores(values):
            return [layer for layer, v in enumerate(values) if v >= low + (high - low) / 2]
        report["trace"].append({"image": rec["label"], "corrupted_by": rec["counterfactual_image"], "clean": high,
                                "corrupted": low, "all_patches_by_layer": hidden[:, block].tolist(),
                                "cls_by_layer": hidden[:, 0].tolist(),
                                "layers_where_all_patches_restore_half": restores(hidden[:, block].tolist()),
                                "layers_where_cls_restores_half": restores(hidden[:, 0].tolist())})
    for i, rec in enumerate(lens.prompts):
        at_cls = lens.grids["logit_lens"].values[i, :, 0].tolist()
        top = [layer[0][0][0] for layer in rec["logit_lens_top_k"]]
        report["lens"].append({"image": rec["image"], "target": rec["target"], "p_target_at_cls_by_layer": at_cls,
                               "top1_at_cls_by_layer": top,
                               "first_layer_top1_at_cls": next((k for k, t in enumerate(top) if t == rec["target"]), None)})
    return report


@torch.no_grad()
def tower_states(vlm, seeds: range) -> tuple[torch.Tensor, list[int]]:
    """``(renders, layers + 1, d)`` patch-mean states of every tower layer's output (index 0: its input), and the
    country of each render."""
    from interventions.modalities.vision_language.tower import ImageToAnswer
    from interventions.testbeds.flags import COUNTRIES, render

    model = ImageToAnswer(vlm)
    rows, countries = [], []
    for seed in seeds:
        pixels = render(list(range(len(COUNTRIES))), torch.Generator().manual_seed(seed))
        h = model.tower.pre_layrnorm(model.patch_embeddings(pixels))
        states = [h[:, 1:].mean(1)]
        for layer in model.tower.encoder.layers:
            h = layer(h, None)
            states.append(h[:, 1:].mean(1))
        rows.append(torch.stack(states, 1))
        countries += list(range(len(COUNTRIES)))
    return torch.cat(rows), countries


def flag_part(out: Path, renders: int) -> dict:
    """The deep flag tower: held-out-country probes for red (and blue) per layer, one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score

    from interventions.modalities.vision_language.llava import load_vlm
    from interventions.models.families import FLAGS_VLM_DEEP
    from interventions.testbeds.flags import COUNTRIES, designs

    vlm, _, _ = load_vlm(FLAGS_VLM_DEEP)
    states, countries = tower_states(vlm, range(1, renders + 1))
    table = designs()
    report = {"renders_per_flag": renders, "flags": len(COUNTRIES)}
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for colour in ("red", "blue"):
        labels = [colour in table[c][1] for c in countries]
        scores = []
        for layer in range(states.shape[1]):
            probe = LogisticRegression(max_iter=2000, C=1.0)
            scores.append(float(cross_val_score(probe, states[:, layer].numpy(), labels, groups=countries,
                                                cv=GroupKFold(n_splits=6)).mean()))
        base = max(sum(labels), len(labels) - sum(labels)) / len(labels)
        report[colour] = {"flags_with_it": sum(colour in table[c][1] for c in range(len(COUNTRIES))),
                          "majority_baseline": base, "heldout_flag_accuracy_by_layer": scores}
        ax.plot(range(states.shape[1]), scores, marker="o", label=f"'{colour}' in the flag (majority {base:.2f})")
    ax.set_xticks(range(states.shape[1]), ["embed"] + [str(i) for i in range(states.shape[1] - 1)])
    ax.set_xlabel("tower layer (patch-mean state after it)")
    ax.set_ylabel("probe accuracy on unseen flags")
    ax.set_title("llava-flags-deep-smollm2: is the colour decodable?", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "flag_tower.png", dpi=120)
    plt.close(fig)
    return report


def scenes_part(out: Path, threads: int) -> dict:
    """The scenes text-to-image testbed: its recipe's trace, run as a user would."""
    run_dir = out / "scenes_run"
    subprocess.run([sys.executable, "-m", "recipes.cli", "--threads", str(threads), "run", str(RED_SCENES),
                    "--out", str(run_dir), "--quiet"], check=True, cwd=PROJECT)
    result = json.loads((run_dir / "result.json").read_text())
    (out / "scenes.png").write_bytes((run_dir / "heatmap.png").read_bytes())
    record = result["prompts"][0]
    report = {"prompt": record["prompt"], "corrupted_prompt": record.get("corrupted_prompt"),
              "clean": record["clean_prob"], "corrupted": record["corrupted_prob"], "grids": {}}
    for name, grid in result["grids"].items():
        report["grids"][name] = {"layers": grid["layers"], "by_token": {
            token: [row[c] for row in grid["values"][0]] for c, token in enumerate(record["columns"])}}
    for f in run_dir.iterdir():
        f.unlink()
    run_dir.rmdir()
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RECIPES / "figures/red_three_models")
    ap.add_argument("--renders", type=int, default=20, help="jittered renders per flag for the tower probes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="clip,flags,scenes", help="which models to run (comma-separated); the "
                    "others keep their entries in an existing results.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    existing = args.out / "results.json"
    report = json.loads(existing.read_text()) if existing.is_file() else {}
    parts = {"clip": ("scenes-clip", lambda: clip_part(args.out)),
             "flags": ("llava-flags-deep-smollm2", lambda: flag_part(args.out, args.renders)),
             "scenes": ("scenes-smollm2", lambda: scenes_part(args.out, args.threads))}
    for part in args.parts.split(","):
        name, compute = parts[part]
        report[name] = compute()
    atomic_write(args.out / "results.json", (json.dumps(report, indent=1) + "\n").encode())
    print(json.dumps(report, indent=1)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
