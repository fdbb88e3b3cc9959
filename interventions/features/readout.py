"""`kind: features`: read a dictionary's features and a layer's MLP neurons on a spec's inputs.

>>> report = run_features(parse_spec(data), model, tokenizer)        # doctest: +SKIP
>>> report["concepts"][0]                                             # doctest: +SKIP
{'concept': 'red', 'feature': {'unit': 1204, 'f1': 0.97, ...}, 'neuron': {'unit': 88, 'f1': 0.71, ...}}

The report holds, per example, each token's top features; for the described units (the most often
active features, the neurons with the largest activations), their top examples with the token marked
``⟦so⟧``; and, when the examples carry concepts, each concept's best feature and best neuron, chosen
and thresholded on one seeded split of the examples and scored on the other (`describe.best_units`).
"""

from __future__ import annotations

import random

import torch

from interventions.core.errors import SpecError
from interventions.core.prompts import encode
from interventions.features.describe import best_union, best_units, detection_scores, max_activating
from interventions.features.dictionary import Dictionary, load_dictionary
from interventions.lenses.lens import collect_states, prepare
from interventions.lenses.probe import fit_logistic
from interventions.lenses.steering import FORMAT_VERSION, SteeringVector
from interventions.models.sites import site_table


def unit_states(model, tokenizer, encs, d: Dictionary | None, layer: int, neurons: bool) -> dict[str, list]:
    """Per example ``Float[Tensor, "tokens units"]``: the dictionary's features, the MLP neurons."""
    out = {}
    if d is not None:
        states, _ = collect_states(model, tokenizer, encs, [d.where.layer], site=d.where.site)
        out["feature"] = [d.encode(s[0]) for s in states]
        out["state"] = [s[0] for s in states]
    if neurons:
        states, _ = collect_states(model, tokenizer, encs, [layer], site="mlp_key")
        out["neuron"] = [s[0] for s in states]
    return out


def check_dictionary(d: Dictionary, model, field: str = "dictionary") -> None:
    """The dictionary reads a site this model has, at a layer it has, of the width it has."""
    table = site_table(model)
    n = table.num_layers(model)
    width = model.config.get_text_config(decoder=True).hidden_size
    if d.where.site not in ("block_output", "block_input", "mlp_output", "attention_output") or d.where.layer is None \
            or not 0 <= d.where.layer < n:
        raise SpecError(field, f"{d.where.site} at layer {d.where.layer}", f"a dictionary at a residual, MLP or "
                        f"attention output of a layer in [0, {n - 1}] of this model")
    if d.d_in != width:
        raise SpecError(field, f"d_in {d.d_in}", f"a dictionary of this model's width ({width})")


def spec_units(spec, model) -> tuple[Dictionary | None, int]:
    """The spec's dictionary (loaded and checked against `model`) and the neurons' layer (checked)."""
    d = load_dictionary(spec.dictionary) if spec.dictionary else None
    if d is not None:
        check_dictionary(d, model)
    n = site_table(model).num_layers(model)
    layer = spec.layer if spec.layer is not None else d.where.layer
    if layer >= n:
        raise SpecError("layer", layer, f"a layer in [0, {n - 1}] (the model has {n})")
    return d, layer


def pooled(acts: list[torch.Tensor], pool: str, skip_first: bool = True) -> torch.Tensor:
    """``[examples, units]``: each example's largest activation after its first token (every one read, when
    not `skip_first`: a VLM's image tokens), or its last."""
    if pool == "last":
        return torch.stack([a[-1] for a in acts])
    return torch.stack([(a[1:] if skip_first and len(a) > 1 else a).max(0).values for a in acts])


def skips_first(spec) -> bool:
    """Whether an example's first token is left out of its pooled activations: yes, unless only a VLM's
    image tokens are read (the first token of a prompt is an outlier of huge norm; an image token is not)."""
    return getattr(spec, "positions", "all") != "image"


def read_examples(spec, model, tokenizer, processor=None) -> tuple[list, list[list[str]], list | None]:
    """Each example's encoding (image merged in, for a VLM), its token labels, and the positions read:
    None (every token), or each example's image positions (`positions: image`)."""
    if spec.modality != "vision-language":
        encs = [encode(tokenizer, e.prompt, field=f"examples[{i}].prompt") for i, e in enumerate(spec.examples)]
        return encs, [tokenizer.convert_ids_to_tokens(list(e.ids)) for e in encs], None
    readings = [prepare(model, tokenizer, e.prompt, field=f"examples[{i}]", processor=processor, image=e.image,
                        vision=True) for i, e in enumerate(spec.examples)]
    tokens = [list(r.enc.tokens) for r in readings]
    for r, toks in zip(readings, tokens):
        for k, p in enumerate(r.groups["image"]):
            toks[p] = f"[image {k}]"
    kept = [list(r.groups["image"]) for r in readings] if spec.positions == "image" else None
    if kept is not None:
        tokens = [[toks[p] for p in keep] for toks, keep in zip(tokens, kept)]
    return [r.enc for r in readings], tokens, kept


def _marked(tokens: list[str], at: int) -> str:
    return "".join(f"⟦{t}⟧" if i == at else t for i, t in enumerate(tokens)).replace("Ġ", " ").replace("▁", " ")


def _describe(acts: list[torch.Tensor], highest: torch.Tensor, tokens: list[list[str]], units: list[int],
              top: int) -> list[dict]:
    """Each unit's top examples (`highest`: its largest activation per example; at which token)."""
    rows = []
    for u in units:
        examples = []
        for i, value in max_activating(highest, u, top):
            at = int(acts[i][:, u].argmax())
            examples.append({"example": i, "token": at, "activation": value, "text": _marked(tokens[i], at)})
        rows.append({"unit": u, "active_share": round(float((highest[:, u] > 0).float().mean()), 4),
                     "examples": examples})
    return rows


def _chosen(kind: str, highest: torch.Tensor, n: int) -> list[int]:
    score = (highest > 0).float().sum(0) if kind == "feature" else highest.abs().max(0).values
    return [int(u) for u in score.argsort(descending=True)[:n]]


def probe_scores(states: list[torch.Tensor], labels: torch.Tensor, fit: torch.Tensor, test: torch.Tensor,
                 skip_first: bool = True) -> list[dict]:
    """Per concept, a logistic probe (L2 1, standardised features; `lenses.probe.fit_logistic`) on each
    example's mean state after its first token (or over every token read, when not `skip_first`) at the
    dictionary's site, fitted on `fit`, with its precision, recall and F1 on `test`: the direction a probe
    finds, beside the best units."""
    x = torch.stack([(s[1:] if skip_first and len(s) > 1 else s).mean(0) for s in states]).double()
    mean, std = x[fit].mean(0), x[fit].std(0).clamp_min(1e-6)
    z = (x - mean) / std
    out = []
    for c in range(labels.shape[1]):
        w, b = fit_logistic(z[fit], labels[fit, c].long(), 2, 1.0)
        predicted = (z[test] @ w.T + b).argmax(-1)
        scores = detection_scores(predicted[:, None].double(), labels[test, c:c + 1], 0.5)
        out.append({k: round(float(v[0, 0]), 4) for k, v in scores.items()})
    return out


def concept_rows(spec, units: dict[str, list]) -> list[dict]:
    names = sorted({c for e in spec.examples for c in e.concepts})
    if not names:
        return []
    labels = torch.tensor([[c in e.concepts for c in names] for e in spec.examples])
    order = list(range(len(spec.examples)))
    random.Random(spec.seed).shuffle(order)
    cut = max(2, min(len(order) - 2, round(len(order) * (1 - spec.heldout))))
    fit, test = torch.tensor(sorted(order[:cut])), torch.tensor(sorted(order[cut:]))
    skip = skips_first(spec)
    best = {kind: best_units(pooled(acts, spec.pool, skip), labels, fit, test, dense=kind == "neuron")
            for kind, acts in units.items() if kind != "state"}
    if "feature" in units:
        best["features"] = best_union(pooled(units["feature"], spec.pool, skip), labels, fit, test)
        best["probe"] = probe_scores(units["state"], labels, fit, test, skip)
    rows = [{"concept": c, "examples": int(labels[:, j].sum()), **{kind: best[kind][j] for kind in best}}
            for j, c in enumerate(names)]
    if "feature" in units:                     # the feature's typical size where it fires: a steering scale
        per_example = pooled(units["feature"], spec.pool, skip)
        for row in rows:
            on = per_example[:, row["feature"]["unit"]]
            row["feature"]["mean_active"] = round(float(on[on > 0].mean()), 4) if bool((on > 0).any()) else 0.0
    return rows


@torch.no_grad()
def run_features(spec, model, tokenizer, units: tuple[Dictionary | None, int] | None = None,
                 processor=None) -> dict:
    """The report of a `kind: features` spec (see the module docstring); `units`: `spec_units`'s answer,
    when the caller has it already; `processor`: a VLM's image processor."""
    d, layer = units or spec_units(spec, model)
    encs, tokens, kept = read_examples(spec, model, tokenizer, processor)
    states = unit_states(model, tokenizer, encs, d, layer, spec.neurons)
    if kept is not None:                      # only the image tokens are read
        states = {kind: [a[keep] for a, keep in zip(acts, kept)] for kind, acts in states.items()}
    report = {"model": spec.model, "dictionary": spec.dictionary, "layer": layer, "examples": len(encs),
              "site": d.where.site if d else "mlp_key", "pool": spec.pool,
              "positions": getattr(spec, "positions", "all")}
    if d is not None:
        report["tokens"] = [[{"token": t, "top": [[int(i), round(float(v), 4)] for v, i in zip(*f[p].topk(spec.top))
                                                  if v > 0]} for p, t in enumerate(toks)]
                            for f, toks in zip(states["feature"], tokens)]
    for kind, acts in states.items():
        if kind != "state":
            highest = torch.stack([a.max(0).values for a in acts])
            report[f"{kind}s"] = _describe(acts, highest, tokens, _chosen(kind, highest, spec.describe),
                                           spec.max_examples)
    report["concepts"] = concept_rows(spec, states)
    return report


def concept_vectors(report: dict, d: Dictionary) -> dict[str, SteeringVector]:
    """Each concept's best feature as a steering vector: its decoder direction times its mean activation
    where it fires, at the dictionary's site and layer (`kind: apply` adds it with `steer:`)."""
    out = {}
    for row in report["concepts"]:
        f = row["feature"]
        out[row["concept"]] = SteeringVector({d.where.layer: d.W_dec[f["unit"]].detach() * f["mean_active"]}, {
            "format_version": FORMAT_VERSION, "site": d.where.site, "layers": [d.where.layer], "model": report["model"],
            "method": "dictionary feature", "feature": f["unit"], "concept": row["concept"],
            "note": "the feature's decoder direction times its mean activation where it fires"})
    return out


def concept_table(report: dict) -> str:
    """The concept table as markdown: best feature and best neuron per concept (held-out F1)."""
    kinds = [k for k in ("feature", "features", "neuron", "probe") if report["concepts"] and k in report["concepts"][0]]
    titles = {"feature": "best feature", "features": "best union of features", "neuron": "best neuron",
              "probe": "probe direction"}
    head = "| concept | examples | " + " | ".join(f"{titles[k]} | F1 (P, R)" for k in kinds) + " |"
    rows = [head, "|" + "---|" * (2 + 2 * len(kinds))]
    for row in report["concepts"]:
        cells = [f"{row[k].get('unit', row[k].get('units', 'logistic'))} | {row[k]['f1']:.2f} "
                 f"({row[k]['precision']:.2f}, {row[k]['recall']:.2f})" for k in kinds]
        rows.append(f"| {row['concept']} | {row['examples']} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
