"""Train a feature dictionary (sparse autoencoder) on one site of a language model, offline.

    lesion train-dictionary --model smollm2-135m --layer 15 --features 4608 --k 32 --out runs/sae_l15
    lesion train-dictionary --model llava-flags-smollm2 --flag-renders 300 --layer 3 --features 512 --k 8 --out runs/sae_flags

Texts: `--text` files (passages separated by blank lines), or text sampled from the model itself
after generic openings (`editors.stats.model_samples`, as the tuned lens). On the flag testbed
(`--flag-renders N`): N jittered renders of every flag (seeds 1..N, shuffled), read at the image
tokens, with the naming prompt after the image; the downstream loss is the country name's
(`interventions.features.images`). 10% are held out for the report (L0, explained variance, dead
features, loss recovered). Ends with one JSON line.
"""

from __future__ import annotations

import json
import time


def read_passages(paths: list[str]) -> list[str]:
    from interventions.core.reading import read_text

    passages = []
    for i, path in enumerate(paths):
        text = read_text(path, f"--text[{i}]", "a UTF-8 text file (passages separated by blank lines)")
        passages += [p.strip() for p in text.split("\n\n") if p.strip()]
    return passages


def check_options(args, model) -> None:
    from interventions.core.errors import SpecError

    n = model.config.get_text_config(decoder=True).num_hidden_layers
    if args.layer >= n:
        raise SpecError("--layer", args.layer, f"a layer in [0, {n - 1}] ({args.model} has {n})")
    if args.architecture == "topk" and args.k > args.features:
        raise SpecError("--k", args.k, f"at most --features ({args.features})")


#: What the flag testbed is asked after each image while its dictionary is trained (its answer: the country).
FLAG_PROMPT = " This is the flag of"


def flag_data(args, model, tokenizer, processor) -> tuple[list, dict, str]:
    """The flag renders as ``(image, country)`` items (shuffled by the seed), the image reader and loss."""
    import random

    from interventions.features.images import answer_losses, image_reader
    from interventions.testbeds.flags import COUNTRIES

    items = [(f"flag:{c}@{s}", f" {c}") for s in range(1, args.flag_renders + 1) for c, _ in COUNTRIES]
    random.Random(args.seed).shuffle(items)
    options = {"read": image_reader(model, tokenizer, FLAG_PROMPT, processor),
               "losses": answer_losses(model, tokenizer, FLAG_PROMPT, processor)}
    return items, options, (f"{args.flag_renders} jittered renders of each of the {len(COUNTRIES)} flags (seeds 1-"
                            f"{args.flag_renders}), read at the image tokens after{FLAG_PROMPT!r}")


def main(args) -> int:
    import torch

    from editors.stats import model_samples
    from interventions.core.atomic import check_out
    from interventions.core.errors import SpecError
    from interventions.features.dictionary import Where
    from interventions.features.training import train_dictionary
    from interventions.modalities.vision_language.llava import load_language_or_vision
    from interventions.models.families import is_vision_language

    out = check_out(args.out, True, "the dictionary")
    texts = read_passages(args.text) if args.text else None
    torch.manual_seed(args.seed)
    vision = is_vision_language(args.model)
    if vision != bool(args.flag_renders):
        raise SpecError("--flag-renders", args.flag_renders, "a number of renders for the flag testbed (a vision-language "
                        "model), and no --flag-renders for a language model")
    model, tokenizer, processor = load_language_or_vision(args.model, vision=vision)
    check_options(args, model)
    start = time.perf_counter()
    options = {}
    if vision:
        texts, options, data = flag_data(args, model, tokenizer, processor)
    elif texts is None:
        texts = model_samples(model, tokenizer, n_texts=args.texts, length=args.length, seed=args.seed)
        data = f"{args.texts} texts of up to {args.length} tokens sampled from the model (top-k 5, seed {args.seed})"
    else:
        data = f"{len(texts)} passages from {', '.join(args.text)}"
    if len(texts) < 2:
        raise SpecError("--text", args.text, "at least two passages (one is held out)")
    sample_seconds = time.perf_counter() - start
    d, report = train_dictionary(model, tokenizer, texts, Where(args.site, args.layer, args.model),
                                 features=args.features, architecture=args.architecture, k=args.k, l1=args.l1,
                                 epochs=args.epochs, batch_tokens=args.batch_tokens, buffer_tokens=args.buffer_tokens,
                                 lr=args.lr, seed=args.seed, **options)
    report.update(model=args.model, site=args.site, layer=args.layer, data=data, sample_seconds=round(sample_seconds, 1),
                  command="lesion " + " ".join(args.argv))
    d.meta = {"report": report}
    d.save(out)
    print(f"wrote {out}: L0 {report['l0']}, explained variance {report['explained_variance']}, "
          f"loss recovered {report['loss_recovered']}")
    print(json.dumps(report))
    return 0
