"""Train a tuned lens (Belrose et al. 2023) for a language model, offline, and save it as safetensors.

    lesion train-lens --model smollm2-135m --out checkpoints/tuned_lens_smollm2.safetensors

The recipe (stated in the README and in the file's metadata): text sampled from the model itself
after generic openings (`editors.stats.model_samples`: top-k 5, the same offline corpus as ROME's key
statistics here), states of every layer collected once, then Adam on KL(final || lens) for every layer
at once, over random batches of tokens; 10% of the texts are held out and the held-out KL per layer
is reported for the logit lens and the tuned lens. Ends with one JSON line.
"""

from __future__ import annotations

import json
import time


def main(args) -> int:
    import torch

    from editors.stats import model_samples
    from interventions import load_model
    from interventions.core.atomic import check_out_file
    from interventions.lenses.lens import train_tuned_lens

    check_out_file(args.out, "the tuned lens")
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    start = time.perf_counter()
    texts = model_samples(model, tokenizer, n_texts=args.texts, length=args.length, seed=args.seed)
    sample_seconds = time.perf_counter() - start
    lens, report = train_tuned_lens(model, tokenizer, texts, rank=None if args.rank == 0 else args.rank,
                                    steps=args.steps, batch_tokens=args.batch_tokens, lr=args.lr,
                                    max_tokens=args.max_tokens, seed=args.seed)
    report.update(model=args.model, data=f"{args.texts} texts of up to {args.length} tokens sampled from the model "
                  f"(top-k 5, seed {args.seed})", sample_seconds=round(sample_seconds, 1))
    lens.meta = report
    lens.save(args.out)
    logit, tuned = report["heldout_kl_logit_lens"], report["heldout_kl_tuned_lens"]
    print("| layer | held-out KL, logit lens | tuned lens |\n|---|---|---|")
    for layer, (a, b) in enumerate(zip(logit, tuned)):
        print(f"| {layer} | {a:.3f} | {b:.3f} |")
    print(f"wrote {args.out}")
    print(json.dumps({k: v for k, v in report.items() if not k.startswith("heldout_kl")}
                     | {"mean_heldout_kl_logit_lens": round(sum(logit) / len(logit), 4),
                        "mean_heldout_kl_tuned_lens": round(sum(tuned) / len(tuned), 4)}))
    return 0
