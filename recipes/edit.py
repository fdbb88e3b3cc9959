"""Run `kind: edit` and `kind: apply` specs: compute a Delta, evaluate it, save it; or apply saved deltas.

    lesion run recipes/edit_eiffel.yaml --out runs/edit          # writes delta.safetensors + metrics.json
    lesion apply --model smollm2-135m --delta runs/edit/delta.safetensors --prompt "The Eiffel Tower is in"
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from editors.delta import Delta, applied, apply, load_delta, revert
from editors.evaluate import evaluate
from editors.locate import Located, locate_layers
from editors.memit import MemitHyperParams, compute_memit
from editors.rome import EditRequest, RomeHyperParams, compute_rome
from editors.stats import second_moments
from interventions.errors import SpecError
from interventions.prompts import pad_token_id
from interventions.spec import ApplySpec, EditSpec, spec_to_dict


def hyperparameters(spec: EditSpec) -> RomeHyperParams | MemitHyperParams:
    """The method's hyperparameters: its defaults with the spec's overrides (whose names and types the
    spec already checked against `interventions.spec.HYPERPARAMETERS`)."""
    cls, where = (RomeHyperParams, {"layer": spec.layer}) if spec.method == "rome" else \
        (MemitHyperParams, {"layers": spec.layers})
    try:
        return cls(**where, mom2_tokens=spec.mom2_tokens, **spec.hyperparameters)
    except ValueError as err:
        raise SpecError("hyperparameters", dict(spec.hyperparameters), str(err)) from None


def delta_layers(spec: EditSpec) -> list[int]:
    return [spec.layer] if spec.method == "rome" else list(spec.layers)


def fmt_metric(x: float | None) -> str:
    """A metric for a table: three decimals, or n/a where there was nothing to measure."""
    return "n/a" if x is None else f"{x:.3f}"


def edit_request(r) -> EditRequest:
    """The editor's request for one `requests[i]` entry of an edit spec."""
    return EditRequest(r.prompt, r.subject, r.target_new, r.target_true)


def corpus_texts(spec: EditSpec) -> list[str] | None:
    if not spec.corpus:
        return None
    texts = []
    for i, path in enumerate(spec.corpus):
        if not Path(path).is_file():
            raise SpecError(f"corpus[{i}]", path, "an existing text file")
        texts += [t for t in Path(path).read_text().split("\n\n") if t.strip()]
    return texts


def key_statistics(spec: EditSpec, model, tokenizer, layers) -> dict[int, torch.Tensor]:
    return second_moments(model, tokenizer, layers, corpus_texts(spec), max_tokens=spec.mom2_tokens,
                          corpus_name="files" if spec.corpus else "model-samples")


def resolve_layers(spec: EditSpec, model, tokenizer) -> tuple[EditSpec, Located | None]:
    """`layer: auto` / `layers: auto` replaced by the layers a causal trace picks (see editors.locate)."""
    auto = spec.layer == "auto" if spec.method == "rome" else spec.layers == "auto"
    if not auto:
        return spec, None
    found = locate_layers(model, tokenizer, spec.requests, spec.locate, model_name=spec.model)
    update = {"layer": found.layer} if spec.method == "rome" else {"layers": found.layers}
    return spec.model_copy(update=update), found


def compute_edit(spec: EditSpec, model, tokenizer) -> tuple[Delta, list[dict]]:
    """ROME: each request in turn, each computed with the earlier ones applied, combined into one
    rank-n Delta. MEMIT: all requests at once. The model is unchanged afterwards.
    `spec` must have its layers resolved (`resolve_layers`)."""
    if spec.layer == "auto" or spec.layers == "auto":
        raise ValueError("compute_edit needs resolved layers: call resolve_layers(spec, model, tokenizer) first")
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    layers = [spec.layer] if spec.method == "rome" else list(spec.layers)
    if max(layers) >= n_layers:
        field = "layer" if spec.method == "rome" else "layers"
        raise SpecError(field, spec.layer if spec.method == "rome" else list(spec.layers),
                        f"layers in [0, {n_layers - 1}] (the model has {n_layers})")
    hp = hyperparameters(spec)
    C = key_statistics(spec, model, tokenizer, layers)
    requests = [edit_request(r) for r in spec.requests]
    if spec.method == "memit":
        delta, info = compute_memit(model, tokenizer, requests, hp, base_model=spec.model, C=C,
                                    spec=spec_to_dict(spec))
        return delta, info["layers"]
    C = C[spec.layer]
    parts, details = [], []
    try:
        for request in requests:
            delta, info = compute_rome(model, tokenizer, request, hp, base_model=spec.model, C=C)
            apply(model, delta)
            parts.append(delta)
            details.append({"subject": request.subject, "v_star_nll": delta.meta["metrics"]["v_star_nll"]})
    finally:
        revert(model, *parts)
    (name,) = parts[0].names
    u = torch.cat([d.factors[name][0] for d in parts], dim=1)
    v = torch.cat([d.factors[name][1] for d in parts], dim=0)
    combined = Delta.from_factors(model, {name: (u, v)}, method="rome", base_model=spec.model,
                                  hyperparameters=parts[0].meta["hyperparameters"], spec=spec_to_dict(spec))
    return combined, details


def run_edit(spec: EditSpec, model, tokenizer, out: str | Path) -> dict:
    out = Path(out)
    seconds = {}
    start = time.perf_counter()
    spec, found = resolve_layers(spec, model, tokenizer)
    if found is not None:
        found.result.save(out / "locate")
        seconds["locate"] = time.perf_counter() - start
    start = time.perf_counter()
    delta, details = compute_edit(spec, model, tokenizer)
    seconds["edit (statistics included)"] = time.perf_counter() - start
    start = time.perf_counter()
    prompts = list(spec.fluency_prompts) or [r.subject for r in spec.requests]
    before = evaluate(model, tokenizer, spec.requests, fluency_prompts=prompts)
    with applied(model, delta):
        after = evaluate(model, tokenizer, spec.requests, fluency_prompts=prompts)
    seconds["evaluate"] = time.perf_counter() - start
    metrics = {k: after[k] for k in ("efficacy", "paraphrase", "neighbourhood", "fluency")}
    metrics["fluency_unedited"] = before["fluency"]
    delta = delta.with_metrics(metrics)
    if found is not None:
        delta.meta["located"] = found.summary()
    path = delta.save(out / "delta.safetensors")
    report = {"delta": path.name, "bytes": path.stat().st_size, "layers": delta_layers(spec), "edited": delta.names,
              "metrics": delta.meta["metrics"], "lesion_version": delta.meta.get("lesion_version"),
              "located": found.summary() if found else None, "seconds": seconds, "before": before, "after": after,
              "optimisation": details}
    (out / "metrics.json").write_text(json.dumps(report, indent=1))
    return report


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    pad = pad_token_id(tokenizer)
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def run_apply(spec: ApplySpec, model, tokenizer) -> list[dict]:
    """Greedy generations without and with the deltas (verified against the base first) and the
    steering vector (checked against the model), both loaded before anything is generated."""
    from interventions.steer import check_vector, load_vector, steering

    deltas = [load_delta(p) for p in spec.deltas]
    vector = load_vector(spec.steer) if spec.steer else None
    if vector is not None:
        check_vector(model, vector)
    rows = [{"prompt": p, "base": generate(model, tokenizer, p, spec.max_new_tokens)} for p in spec.prompts]
    with applied(model, *deltas):
        if vector is None:
            for row in rows:
                row["edited"] = generate(model, tokenizer, row["prompt"], spec.max_new_tokens)
        else:
            with steering(model, tokenizer, vector, coef=spec.coef, apply_to=spec.apply_to) as steer:
                texts = steer.generate(list(spec.prompts), max_new_tokens=spec.max_new_tokens)
            for row, text in zip(rows, texts):
                row["edited"] = text
    return rows
