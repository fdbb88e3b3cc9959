"""Network Dissection on the flag testbed: which image-token features and neurons segment a flag's colours.

    python -m recipes.studies.flag_iou --dictionary checkpoints/sae_flags_vlm_l3 --renders 20 --out runs/flag_iou

Each image token of the flag VLM reads one 16x16 patch of the 32x32 image (row-major, 2x2). The truth
is drawn from the pixels: every pixel is named by its nearest palette colour, or as the grey
background; a patch holds a colour when at least `--share` of its pixels have it. A unit's activation
at an image token is compared with the patch's colours: IoU = Σ|A ∩ M| / Σ|A ∪ M| over all patches
(`interventions.features.describe.iou_scores`, Bau et al. 2017). Each unit's threshold is chosen on
one seeded half of the renders (the quantile of its activations among 0.5 … 0.995 with the best IoU),
and every IoU reported is on the other half, for the dictionary's features and for the MLP neurons of
its layer alike, beside the IoU of a unit that fires on every patch (the share of patches holding
the colour). Writes ``OUT/results.json`` and ``OUT/table.md``; the last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from interventions.core.atomic import atomic_write
from interventions.features.describe import iou_scores
from interventions.features.dictionary import load_dictionary
from interventions.lenses.lens import collect_states, prepare
from interventions.modalities.vision_language.llava import load_image, load_vlm
from interventions.testbeds.flags import COUNTRIES, PALETTE

QUANTILES = (0.5, 0.75, 0.9, 0.95, 0.99, 0.995)
BACKGROUND = (0.5, 0.5, 0.5)         # what `flags.render` draws outside the flag


def patch_colours(pixels: torch.Tensor, grid: int, share: float) -> torch.Tensor:
    """``Bool[grid*grid, colours]``: which palette colours cover at least `share` of each patch (row-major)."""
    names = list(PALETTE)
    centres = torch.tensor([PALETTE[n] for n in names] + [BACKGROUND])           # the background last
    nearest = (pixels.permute(1, 2, 0)[..., None, :] - centres).norm(dim=-1).argmin(-1)      # (H, W)
    size = pixels.shape[-1] // grid
    out = torch.zeros(grid * grid, len(names), dtype=torch.bool)
    for k in range(grid * grid):
        r, c = divmod(k, grid)
        block = nearest[r * size:(r + 1) * size, c * size:(c + 1) * size]
        for j in range(len(names)):
            out[k, j] = float((block == j).float().mean()) >= share
    return out


def unit_acts(vlm, tokenizer, d, refs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[images * image tokens, units]`` feature and MLP-neuron activations at the image tokens."""
    readings = [prepare(vlm, tokenizer, " This is the flag of", field=f"images[{i}]", image=ref, vision=True)
                for i, ref in enumerate(refs)]
    encs = [r.enc for r in readings]
    feats, neurons = [], []
    for site, out in (("block_output", feats), ("mlp_key", neurons)):
        states, _ = collect_states(vlm, tokenizer, encs, [d.where.layer], site=site)
        for s, r in zip(states, readings):
            x = s[0][list(r.groups["image"])]
            out.append(d.encode(x) if site == "block_output" else x)
    return torch.cat(feats).detach(), torch.cat(neurons)


def dissect(acts: torch.Tensor, masks: torch.Tensor, fit: torch.Tensor, test: torch.Tensor) -> list[dict]:
    """Per concept: the unit with the best test IoU, its threshold fitted on `fit` (see the module docstring)."""
    levels = torch.quantile(acts[fit].double(), torch.tensor(QUANTILES, dtype=torch.double), dim=0)   # (q, units)
    fitted = torch.stack([iou_scores(acts[fit], masks[fit], level) for level in levels])           # (q, units, c)
    best_level = fitted.argmax(0)                                                                   # (units, c)
    out = []
    for c in range(masks.shape[1]):
        thresholds = levels.gather(0, best_level[:, c][None]).squeeze(0)
        test_iou = iou_scores(acts[test], masks[test][:, [c]], thresholds)[:, 0]
        fit_iou = fitted.max(0).values[:, c]
        u = int(fit_iou.argmax())                        # the unit is chosen on the fit half too
        out.append({"unit": u, "iou": round(float(test_iou[u]), 4), "threshold": round(float(thresholds[u]), 4),
                    "best_test_iou_any_unit": round(float(test_iou.max()), 4)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dictionary", required=True)
    ap.add_argument("--renders", type=int, default=20)
    ap.add_argument("--first-seed", type=int, default=10001)
    ap.add_argument("--share", type=float, default=0.1, help="share of a patch's pixels that makes it hold a colour")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    vlm, tokenizer, _ = load_vlm("llava-flags-smollm2")
    d = load_dictionary(args.dictionary)
    refs = [f"flag:{c}@{args.first_seed + r}" for r in range(args.renders) for c, _ in COUNTRIES]
    grid = vlm.config.vision_config.image_size // vlm.config.vision_config.patch_size
    masks = torch.cat([patch_colours(load_image(ref, vlm), grid, args.share) for ref in refs])
    feats, neurons = unit_acts(vlm, tokenizer, d, refs)
    images = list(range(len(refs)))
    random.Random(args.seed).shuffle(images)
    per = grid * grid
    halves = [sorted(p for i in part for p in range(i * per, (i + 1) * per))
              for part in (images[:len(images) // 2], images[len(images) // 2:])]
    fit, test = (torch.tensor(h) for h in halves)
    rows = {"feature": dissect(feats, masks, fit, test), "neuron": dissect(neurons, masks, fit, test)}
    names = list(PALETTE)
    report = {"dictionary": args.dictionary, "layer": d.where.layer, "images": len(refs), "patches": len(masks),
              "share": args.share, "colours": {n: {"patches": int(masks[:, j].sum()), "feature": rows["feature"][j],
                                                   "neuron": rows["neuron"][j],
                                                   "always_on": round(float(masks[test, j].double().mean()), 4)}
                                               for j, n in enumerate(names)},
              "seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads()}
    lines = ["| colour | patches | best feature | IoU | best MLP neuron | IoU | a unit on everywhere: IoU |",
             "|---|---|---|---|---|---|---|"]
    for n, r in report["colours"].items():
        lines.append(f"| {n} | {r['patches']} | {r['feature']['unit']} | {r['feature']['iou']:.2f} | "
                     f"{r['neuron']['unit']} | {r['neuron']['iou']:.2f} | {r['always_on']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "results.json", json.dumps(report, indent=1).encode())
    atomic_write(args.out / "table.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    mean = {k: round(sum(r[k]["iou"] for r in report["colours"].values()) / len(names), 4) for k in ("feature", "neuron")}
    print(json.dumps({"study": "flag_iou", "mean_iou_feature": mean["feature"], "mean_iou_neuron": mean["neuron"],
                      "patches": len(masks), "seconds": report["seconds"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
