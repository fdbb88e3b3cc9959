"""Edit the VLM testbed so that the capital of the country *shown* changes for one flag (ROME at the image).

    lesion --threads 2 edit-flag --country France --target Rome --layer 4 --image-stats 4 --out runs/edit_flag

The key and value are read at the image tokens of the edit question (`editors.methods.rome_vision_language`);
C is SmolLM2's own key second moment at that layer (text sampled from the LM), plus with
``--image-stats N`` that of the image-token keys of N jittered renders of every flag (seeds 100..). Reported, before and
after, on held-out renders of the flag (new seeds):
- efficacy: the edit question answers `target`;
- generalisation: paraphrased questions (never used for the edit) answer `target`;
- specificity: the other 23 flags keep their top-1 answer to the edit question and to each paraphrase;
- naming: the edited flag's own renders are still named as the country ("This is the flag of");
  v*'s KL term on that prompt (``--kl-factor``, 1.0: ROME's 0.0625 lets the flag turn into Italy's);
- text: "The capital of <country> is" (the country named in text) — does the edit reach it?
"""

from __future__ import annotations

import json
import time

import torch

from editors.delta import applied
from editors.methods.rome import RomeHyperparameters
from editors.methods.rome_vision_language import compute_vlm_rome, image_key_moment
from editors.stats import second_moment
from interventions.core.atomic import atomic_write
from interventions.modalities.vision_language.llava import VLM_TESTBED, load_images, load_vlm_testbed
from interventions.modalities.vision_language.llava import top_answers as answers
from interventions.models.loading import load_model
from interventions.testbeds.flags import COUNTRIES, render

EDIT_QUESTIONS = (" This is the flag of a country whose capital is",)
PARAPHRASES = (" The capital of this country is", " Its capital city is")


def measure(vlm, tokenizer, country: int, target: str, seed: int, n: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    own = render([country] * n, g)
    others = [i for i in range(len(COUNTRIES)) if i != country]
    other_px = render(others, g)
    out = {"efficacy": sum(a == target for q in EDIT_QUESTIONS for a in answers(vlm, tokenizer, own, q))
           / (n * len(EDIT_QUESTIONS))}
    out["generalisation"] = {q.strip(): sum(a == target for a in answers(vlm, tokenizer, own, q)) / n
                             for q in PARAPHRASES}
    out["naming"] = sum(a == COUNTRIES[country][0] for a in answers(vlm, tokenizer, own, " This is the flag of")) / n
    out["other_flags_answers"] = {q.strip(): answers(vlm, tokenizer, other_px, q) for q in EDIT_QUESTIONS + PARAPHRASES}
    name = COUNTRIES[country][0]
    ids = torch.tensor([tokenizer(f"{tokenizer.bos_token or ''}The capital of {name} is",
                                  add_special_tokens=False).input_ids])
    out["text_answer"] = tokenizer.decode(int(vlm(input_ids=ids).logits[0, -1].argmax())).strip()
    return out


def main(args) -> int:
    from interventions.core.atomic import atomic_folder, check_out

    out = check_out(args.out, True, "the edit")
    names = [c for c, _ in COUNTRIES]
    if args.country not in names:
        from interventions.core.errors import SpecError, one_of

        raise SpecError("--country", args.country, one_of(args.country, names))
    country = names.index(args.country)
    vlm, tokenizer, meta = load_vlm_testbed()
    start = time.perf_counter()
    C, image_keys = _key_moment(args, vlm, tokenizer, meta)
    c_seconds = time.perf_counter() - start
    # the subject: `--renders` jittered renders (k* and v* over all of them), none of them held out
    pixels = render([country] * args.renders, torch.Generator().manual_seed(args.seed))
    start = time.perf_counter()
    # --target is the answer word; as the word after the question it is tokenized with its space
    delta, info = compute_vlm_rome(vlm, tokenizer, pixels, list(EDIT_QUESTIONS), " " + args.target, layer=args.layer, C=C,
                                   base_model=VLM_TESTBED, hp=RomeHyperparameters(layer=args.layer, kl_factor=args.kl_factor))
    edit_seconds = time.perf_counter() - start
    before = measure(vlm, tokenizer, country, args.target, args.seed + 1)
    with applied(vlm, delta):
        after = measure(vlm, tokenizer, country, args.target, args.seed + 1)
    specificity = {q: sum(a == b for a, b in zip(before["other_flags_answers"][q], after["other_flags_answers"][q]))
                   / len(before["other_flags_answers"][q]) for q in before["other_flags_answers"]}
    report = {"country": args.country, "target": args.target, "layer": args.layer, "edit_seconds": edit_seconds,
              "kl_factor": args.kl_factor, "renders": args.renders,
              "image_stats": {"renders_per_flag": args.image_stats, "keys": image_keys},
              "C_seconds": c_seconds, "before": before, "after": after,
              "specificity": specificity, "v_star_steps": len(info["history"]),
              "final_nll": info["history"][-1]["nll"]}
    with atomic_folder(out) as staging:
        delta.with_metrics({"efficacy": after["efficacy"], "specificity": specificity}).save(
            staging / "delta.safetensors")
        atomic_write(staging / "report.json", json.dumps(report, indent=1).encode())
    _print_report(args, report, out)
    if args.checkpoint:
        _ship(args, out, delta, report)
    return 0


def _key_moment(args, vlm, tokenizer, meta) -> tuple[torch.Tensor, int]:
    """C at the edit layer from the language model's text, plus (`--image-stats`) the image-token keys of
    jittered renders of every flag at seeds 100.. (neither the edit render nor the held-out ones)."""
    lm, lm_tok = load_model(meta["language_model"])
    C = second_moment(lm, lm_tok, args.layer, None, max_tokens=args.mom2_tokens)
    if not args.image_stats:
        return C, 0
    corpus = [px for k in range(args.image_stats) for px in load_images(f"flag:*@{100 + k}", vlm)]
    C_images, image_keys = image_key_moment(vlm, tokenizer, torch.stack(corpus), args.layer)
    return C + C_images, image_keys


def _print_report(args, report: dict, out) -> None:
    before, after, specificity = report["before"], report["after"], report["specificity"]
    stats = f" + the image-token keys of {args.image_stats} renders of every flag" if args.image_stats else ""
    print(f"ROME at layer {args.layer}, key at the image tokens of the {args.country} flag -> {args.target!r} "
          f"in {report['edit_seconds']:.1f} s (C from text{stats}: {report['C_seconds']:.1f} s)")
    print("| metric | before | after |\n|---|---|---|")
    print(f"| efficacy (edit question, held-out renders) | {before['efficacy']:.2f} | {after['efficacy']:.2f} |")
    for q in PARAPHRASES:
        print(f"| generalisation: {q.strip()!r} | {before['generalisation'][q.strip()]:.2f} | "
              f"{after['generalisation'][q.strip()]:.2f} |")
    for q, v in specificity.items():
        print(f"| specificity: other flags keep their answer to {q!r} | 1.00 | {v:.2f} |")
    print(f"| naming kept: 'This is the flag of' -> {args.country} | {before['naming']:.2f} | {after['naming']:.2f} |")
    print(f"| text 'The capital of {args.country} is' | {before['text_answer']} | {after['text_answer']} |")
    print(f"wrote delta.safetensors, report.json to {out}")


def _ship(args, out, delta, report: dict) -> None:
    import sys

    from recipes.train.manifest import check_name, register

    after = report["after"]
    row = register(out / "delta.safetensors", f"{check_name(args.checkpoint)}.safetensors", kind="delta",
                   recipe="recipes/studies/edit_flag.py", command=" ".join(["lesion", *sys.argv[1:]]),
                   base_model=VLM_TESTBED, method="rome-vlm", edited=delta.names, layer=args.layer,
                   image_stats=report["image_stats"],
                   kl_factor=args.kl_factor, renders=args.renders,
                   metrics={"efficacy": after["efficacy"], "specificity": report["specificity"], "naming": after["naming"],
                            "generalisation": after["generalisation"], "text_answer_after": after["text_answer"]})
    print(f"shipped checkpoints/{row['path']} ({row['bytes']} bytes) and its manifest entry")
