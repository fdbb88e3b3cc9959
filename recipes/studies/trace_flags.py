"""Where does SmolLM2 recall a country's capital when the country arrives as an image, and when as text?

    lesion --threads 2 trace-flags --out runs/trace_flags [--countries France Germany Japan] [--samples 5]

For each country, on the VLM testbed (SmolLM2-135M inside LLaVA, the trained flag vision tower):

- image: "<flag> This is the flag of a country whose capital is" -> capital; the image tokens are
  corrupted with 3σ noise and each (layer, position) state of the LM is restored in turn;
- text: "The capital of <country> is" -> capital, noise on the country's token embeddings, on the
  same language-model weights.

Both are traces on the one engine (`interventions.run`), with its conventions: the same window rule
(ROME's, clipped at the edges), noise keyed by the prompt, the target as written (" Paris").

Writes ``results.json`` (every grid, the per-layer summaries) and ``compare.png``: the hidden-state
heatmaps side by side, the MLP and attention effects at the subject (image tokens / country token)
and at the last token per layer, and the per-patch effect overlaid on the flag.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from interventions.core.atomic import atomic_write
from interventions.core.plot import patch_overlay
from interventions.modalities.vision_language.llava import load_vlm_testbed
from interventions.testbeds.flags import COUNTRIES, render

QUESTION = " This is the flag of a country whose capital is"
SITES = ("hidden", "mlp", "attention")


def text_trace(vlm, tokenizer, country: str, capital: str, samples: int, seed: int):
    """The trace of "The capital of <country> is" on the VLM's language model (text only)."""
    from interventions import parse_spec, run

    spec = parse_spec({"kind": "trace", "prompts": [{"prompt": f"The capital of {country} is", "subject": country,
                                                     "target": " " + capital}], "samples": samples, "seed": seed})
    return run(spec, vlm, tokenizer, progress=False)


def image_trace(vlm, tokenizer, image: str, capital: str, samples: int, seed: int):
    """The trace of "<flag> This is the flag of a country whose capital is" with noise on the image tokens,
    every image token its own column (so columns are positions)."""
    from interventions import parse_spec, run

    spec = parse_spec({"kind": "trace", "model": "llava-flags-smollm2", "image_cells": "each", "samples": samples,
                       "seed": seed, "prompts": [{"image": image, "prompt": QUESTION, "target": " " + capital}]})
    return run(spec, vlm, tokenizer, progress=False)


def summarize(values: torch.Tensor, subject: list[int], last: int) -> dict:
    """Per layer: the mean effect over the subject positions and the effect at the last position."""
    return {"subject": values[:, subject].mean(dim=1).tolist(), "last": values[:, last].tolist()}


def main(args) -> int:
    from interventions.core.atomic import atomic_folder, check_out

    out = check_out(args.out, True, "the comparison")
    names = [c for c, _ in COUNTRIES]
    for country in args.countries:     # before the testbed loads
        if country not in names:
            from interventions.core.errors import SpecError, one_of

            raise SpecError("--countries", country, one_of(country, names))
    vlm, tokenizer, meta = load_vlm_testbed()
    report = {"question": QUESTION, "samples": args.samples, "countries": {}}
    panels = []
    start = time.perf_counter()
    for country in args.countries:
        i = names.index(country)
        capital = COUNTRIES[i][1]
        pixels = render([i], torch.Generator().manual_seed(args.seed + i))[0]     # = flag:<country>@<seed + i>
        image = image_trace(vlm, tokenizer, f"flag:{country}@{args.seed + i}", capital, args.samples, args.seed)
        grids, rec = image.grids, image.prompts[0]
        text = text_trace(vlm, tokenizer, country, capital, args.samples, args.seed)
        trec = text.prompts[0]
        entry = {"capital": capital, "image": {"clean": rec["clean_prob"], "corrupted": rec["corrupted_prob"],
                                               "tokens": rec["tokens"], "image_positions": rec["image_positions"]},
                 "text": {"clean": trec["clean_prob"], "corrupted": trec["corrupted_prob"], "tokens": trec["tokens"],
                          "subject_positions": trec["subject_positions"]}}
        for s in SITES:
            iv = grids[s].values[0, :, :grids[s].lengths[0]]
            tv = text.grids[s].values[0, :, :text.grids[s].lengths[0]]
            entry["image"][s] = {"grid": iv.tolist(), **summarize(iv, rec["image_positions"], iv.shape[1] - 1)}
            entry["text"][s] = {"grid": tv.tolist(), **summarize(tv, trec["subject_positions"], tv.shape[1] - 1)}
        report["countries"][country] = entry
        panels.append((country, pixels, rec, trec, grids, text))
        print(f"{country}: image p({capital}) clean {rec['clean_prob']:.2f} corrupted {rec['corrupted_prob']:.2f}; "
              f"text clean {trec['clean_prob']:.2f} corrupted {trec['corrupted_prob']:.2f}")
    report["seconds"] = time.perf_counter() - start
    report["finding"] = finding(report)
    with atomic_folder(out) as staging:
        atomic_write(staging / "results.json", json.dumps(report, indent=1).encode())
        figure(panels, staging / "compare.png")
    print(report["finding"])
    print(f"wrote results.json, compare.png to {out} in {report['seconds']:.0f} s")
    return 0


def finding(report: dict) -> str:
    """Where the MLP effect at the subject peaks (layer), image vs text, averaged over countries."""
    lines = []
    for site in ("mlp", "attention", "hidden"):
        for where in ("subject", "last"):
            img = torch.tensor([c["image"][site][where] for c in report["countries"].values()]).mean(0)
            txt = torch.tensor([c["text"][site][where] for c in report["countries"].values()]).mean(0)
            lines.append(f"{site} at the {where} ({'image tokens' if where == 'subject' else 'last token'} / "
                         f"{'country token' if where == 'subject' else 'last token'}): image peaks at layer "
                         f"{int(img.argmax())} ({float(img.max()):.2f}), text at layer {int(txt.argmax())} "
                         f"({float(txt.max()):.2f})")
    return "\n".join(lines)


def figure(panels, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 4, squeeze=False, figsize=(17, 3.6 * len(panels)))
    for row, (country, pixels, rec, trec, grids, text) in enumerate(panels):
        iv = grids["hidden"].values[0, :, :grids["hidden"].lengths[0]]
        tv = text.grids["hidden"].values[0, :, :text.grids["hidden"].lengths[0]]
        for ax, vals, tokens, marked, title in (
                (axes[row][0], iv, rec["tokens"], rec["image_positions"], f"image: flag → {rec['answer']}"),
                (axes[row][1], tv, trec["tokens"], trec["subject_positions"], f"text: {trec['prompt']}")):
            im = ax.imshow(vals.T.numpy(), aspect="auto", cmap="Purples", interpolation="nearest")
            ax.set_yticks(range(len(tokens)), [t.replace("Ġ", " ") + ("*" if k in marked else "")
                                               for k, t in enumerate(tokens)], fontsize=6)
            ax.set_xlabel("layer", fontsize=7)
            ax.set_title(f"hidden, {title}", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.04)
        ax = axes[row][2]
        for site, colour in (("mlp", "green"), ("attention", "red")):
            ig, tg = grids[site].values[0], text.grids[site].values[0]
            ax.plot(ig[:, rec["image_positions"]].mean(1), color=colour, label=f"{site} @ image tokens")
            ax.plot(tg[:, trec["subject_positions"]].mean(1), color=colour, ls="--", label=f"{site} @ country token")
        ax.set_xlabel("layer (window centre)", fontsize=7)
        ax.set_ylabel(f"p({rec['answer']})", fontsize=7)
        ax.legend(fontsize=6)
        ax.set_title("restored at the subject: image (solid) vs text (dashed)", fontsize=8)
        layer = int(iv[:, rec["image_positions"]].mean(1).argmax())
        side = int(len(rec["image_positions"]) ** 0.5)
        patch_overlay(axes[row][3], pixels, iv[layer, rec["image_positions"]].view(side, side),
                      f"{country}: per-patch hidden effect at layer {layer}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
