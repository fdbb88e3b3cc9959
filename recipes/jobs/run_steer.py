"""Run `kind: steer` specs: estimate the vector, save it, generate at each coefficient, measure.

    lesion run recipes/steer/steer_ocean.yaml --out runs/steer
    lesion apply --steer runs/steer/vector.safetensors --coef 8 --prompt "I went out yesterday and"

Writes into the output folder:
- vector.safetensors: the vector(s) with their metadata (interventions.lenses.steering);
- generations.jsonl: every generation (prompt, coefficient, sample, text);
- results.json and table.md: per coefficient, the metric(s) and fluency;
- steer.png: the metric against the coefficient, with fluency on a second axis.

Metrics (no network, no judge model):
- `lexicon`: the share of generated words that are in the spec's word list;
- `targets`: the mean log-probability per token of each target continuation, steered;
- fluency: ROME's n-gram entropy of each generation, and its mean negative log-likelihood per
  token under the *unsteered* model (how natural the text is to the model it came from).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch

from editors.evaluate import mean_present, ngram_entropy
from interventions.core.metrics import continuation_logprob
from interventions.core.prompts import pad_token_id, right_pad
from interventions.lenses.steering import estimate, steering
from interventions.spec import SteerSpec, dump_spec, spec_to_dict


def lexicon_share(text: str, lexicon: set[str]) -> float | None:
    words = re.findall(r"[a-z]+", text.lower())
    return sum(w in lexicon for w in words) / len(words) if words else None


@torch.inference_mode()
def unsteered_nll(model, tokenizer, prompts: list[str], continuations: list[list[int]]) -> list[float | None]:
    """Mean negative log-likelihood per token of each continuation after its prompt, unsteered."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), 16):
        ids = [tokenizer(p)["input_ids"] for p in prompts[start:start + 16]]
        conts = continuations[start:start + 16]
        inputs = right_pad([i + c for i, c in zip(ids, conts)], pad_token_id(tokenizer), device)
        logits = model(**inputs, use_cache=False).logits
        out += [-continuation_logprob(logits[b], len(i), c) if c else None for b, (i, c) in enumerate(zip(ids, conts))]
    return out


def is_monotone(values: list[float | None], increasing: bool = True) -> bool:
    xs = [x for x in values if x is not None]
    return all((b >= a) if increasing else (b <= a) for a, b in zip(xs, xs[1:]))


def rises_up_to(coefs: list[float], values: list[float | None]) -> float | None:
    """The largest coefficient up to which `values` rise without a drop (from the first coefficient)."""
    best = None
    for i in range(1, len(values)):
        if values[i] is None or values[i - 1] is None or values[i] < values[i - 1]:
            break
        best = coefs[i]
    return best


def steer_dictionary(spec: SteerSpec, model) -> dict:
    """`method: feature`'s dictionary, loaded and checked against the model and the spec's layer and site, and
    its feature: `estimate`'s keyword arguments (none for the other methods)."""
    if spec.method != "feature":
        return {}
    from interventions.core.errors import SpecError
    from interventions.features.dictionary import load_dictionary
    from interventions.features.readout import check_dictionary

    d = load_dictionary(spec.dictionary)
    check_dictionary(d, model)
    if (d.where.site, d.where.layer) != (spec.site, spec.layers[0]):
        raise SpecError("layers", list(spec.layers), f"the dictionary's layer and site ([{d.where.layer}], "
                        f"site: {d.where.site})")
    if spec.feature is not None and spec.feature >= d.d_sae:
        raise SpecError("feature", spec.feature, f"a feature of the dictionary, in [0, {d.d_sae - 1}]")
    return {"dictionary": d, "feature": spec.feature}


def run_steer(spec: SteerSpec, model, tokenizer, out: str | Path, *, quiet: bool = False) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    positive, negative = spec.contrast()
    vector = estimate(model, tokenizer, positive, negative, layers=list(spec.layers), site=spec.site,
                      read=spec.read, method=spec.method, model_name=spec.model, **steer_dictionary(spec, model))
    vector.meta["spec"] = spec_to_dict(spec)
    vector.save(out / "vector.safetensors")

    rows = [(prompt, coef, k) for coef in spec.coefficients for prompt in spec.prompts for k in range(spec.samples)]
    lexicon = {w.lower() for w in spec.lexicon}
    with steering(model, tokenizer, vector, apply_to=spec.apply_to) as steer:
        ids = steer.generate_ids([r[0] for r in rows], coefs=[r[1] for r in rows],
                                 max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, seed=spec.seed,
                                 sample_ids=[r[2] for r in rows])
        targets = {}
        for target in spec.targets:
            for coef in spec.coefficients:
                targets[(target, coef)] = steer.continuation_logprobs(list(spec.prompts), target,
                                                                      [coef] * len(spec.prompts))
    nll = unsteered_nll(model, tokenizer, [r[0] for r in rows], ids)
    generations = []
    for (prompt, coef, k), t, n in zip(rows, ids, nll):
        text = tokenizer.decode(t, skip_special_tokens=True)
        generations.append({"prompt": prompt, "coef": coef, "sample": k, "text": text,
                            "lexicon_share": lexicon_share(text, lexicon) if lexicon else None,
                            "entropy": ngram_entropy(text), "unsteered_nll": n})
    table = []
    for coef in spec.coefficients:
        gens = [g for g in generations if g["coef"] == coef]
        row = {"coef": coef, "entropy": mean_present([g["entropy"] for g in gens]),
               "unsteered_nll": mean_present([g["unsteered_nll"] for g in gens]),
               "example": gens[0]["prompt"] + gens[0]["text"]}
        if lexicon:
            row["lexicon_share"] = mean_present([g["lexicon_share"] for g in gens])
        for target in spec.targets:
            row[f"logprob[{target}]"] = mean_present(targets[(target, coef)])
        table.append(row)
    metrics = (["lexicon_share"] if lexicon else []) + [f"logprob[{t}]" for t in spec.targets]
    report = {"model": spec.model, "vector": "vector.safetensors", "norms": vector.meta["norms"],
              "table": table, "metrics": metrics,
              "monotone": {m: is_monotone([r[m] for r in table]) for m in metrics},
              "rises_up_to": {m: rises_up_to([r["coef"] for r in table], [r[m] for r in table]) for m in metrics}}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    with open(out / "generations.jsonl", "w") as f:
        for g in generations:
            f.write(json.dumps(g) + "\n")
    (out / "table.md").write_text(markdown_table(table, metrics))
    (out / "spec.yaml").write_text(dump_spec(spec))
    plot(table, metrics, out / "steer.png", title=f"{spec.method} vector, layers {list(spec.layers)}, "
                                                   f"{spec.site}, apply_to {spec.apply_to}")
    return report


def markdown_table(table: list[dict], metrics: list[str]) -> str:
    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    head = ["coef", *metrics, "entropy", "unsteered NLL", "example"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        example = row["example"].replace("\n", " ").replace("|", "/")[:90]
        cells = [f"{row['coef']:g}", *[fmt(row[m]) for m in metrics], fmt(row["entropy"]),
                 fmt(row["unsteered_nll"]), example]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], metrics: list[str], path: Path, *, title: str) -> None:
    """One panel per metric and one for fluency, all against the coefficient."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coefs = [r["coef"] for r in table]
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(3.2 * (len(metrics) + 1), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        ax.plot(coefs, [r[m] for r in table], marker="o")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("coefficient")
    ax = axes[0][-1]
    ax.plot(coefs, [r["unsteered_nll"] for r in table], marker="+", color="black",
            label="NLL under the unsteered model")
    ax.plot(coefs, [r["entropy"] for r in table], marker="x", color="grey", linestyle="--", label="n-gram entropy")
    ax.set_title("fluency", fontsize=9)
    ax.set_xlabel("coefficient")
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def steer_job(spec, args, out: Path) -> dict | None:
    from interventions import load_model

    model, tokenizer = load_model(spec.model, device=args.device)
    start = time.perf_counter()
    report = run_steer(spec, model, tokenizer, out)
    norms = ", ".join(f"layer {k}: {v:.2f}" for k, v in report["norms"].items())
    print(f"{spec.method} steering vector ({norms}) and {len(spec.coefficients)} coefficient(s) x "
          f"{len(spec.prompts)} prompt(s) in {time.perf_counter() - start:.1f} s")
    print(markdown_table(report["table"], report["metrics"]), end="")
    for metric, ok in report["monotone"].items():
        top = report["rises_up_to"][metric]
        print(f"{metric}: " + ("monotone over all coefficients" if ok else
                               f"rises up to coefficient {top:g}, then falls" if top is not None else
                               "does not rise from the first coefficient"))
    print(f"wrote vector.safetensors, generations.jsonl, results.json, table.md, steer.png to {args.out}")
    return None
