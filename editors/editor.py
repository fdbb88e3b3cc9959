"""Run `kind: edit` and `kind: apply` specs: compute a Delta, evaluate it, save it; or apply saved deltas.

    lesion run recipes/edit/edit_eiffel.yaml --out runs/edit          # writes delta.safetensors + metrics.json
    lesion apply --model smollm2-135m --delta runs/edit/delta.safetensors --prompt "The Eiffel Tower is in"
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from editors.delta import Delta, applied, apply, load_delta, relative_norms, revert, stack
from editors.evaluate import evaluate
from editors.locate import Located, locate_layers
from editors.methods import STEPS
from editors.methods.memit import preserved_keys, value_anchor
from editors.methods.rome import EditRequest, context_templates
from editors.requests import read_requests
from editors.sequential import batch_size, run_sequential
from editors.stats import second_moments
from interventions.core.errors import SpecError
from interventions.core.prompts import pad_token_id
from interventions.core.reading import read_text
from interventions.models.sites import site_table
from interventions.spec import EDIT_METHODS, HYPERPARAMETERS, ONE_LAYER_METHODS, ApplySpec, EditSpec, spec_to_dict


def hyperparameters(spec: EditSpec):
    """The method's hyperparameters: its defaults with the spec's overrides (whose names and types the
    spec already checked against `interventions.spec.HYPERPARAMETERS`)."""
    where = {"layer": spec.layer} if spec.method in ONE_LAYER_METHODS else {"layers": spec.layers}
    try:
        return HYPERPARAMETERS[spec.method](**where, mom2_tokens=spec.mom2_tokens, **spec.hyperparameters)
    except ValueError as err:
        raise SpecError("hyperparameters", dict(spec.hyperparameters), str(err)) from None


def delta_layers(spec: EditSpec) -> list[int]:
    return spec.edit_layers


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
        text = read_text(path, f"corpus[{i}]", "a text corpus (passages separated by blank lines)")
        texts += [t for t in text.split("\n\n") if t.strip()]
    return texts


def preservation(spec: EditSpec, model, tokenizer, templates: list[str], hp) -> dict[int, torch.Tensor]:
    """Per edited layer, w K_s K_sᵀ (w: `hp.preserve_scale`) over the keys of `preserve_from`'s distinct
    (prompt, subject) pairs, on the model as it is (`preserved_keys`); empty without `preserve_from`. Its
    subjects must not be edited ones."""
    if spec.preserve_from is None:
        return {}
    pairs = {(r.prompt, r.subject): r for r in read_requests(spec.preserve_from, field="preserve_from")}
    both = sorted({subject for _, subject in pairs} & {r.subject for r in spec.requests})
    if both:
        raise SpecError("preserve_from", spec.preserve_from.path, f"requests about subjects that are not edited "
                        f"({len(both)} are, e.g. {both[0]!r})")
    kept = [edit_request(r) for r in pairs.values()]
    return preserved_keys(model, tokenizer, spec.edit_layers, kept, templates, hp.preserve_scale)


def anchoring(spec: EditSpec, model, tokenizer, templates: list[str], hp) -> float | None:
    """NAS's anchor (`value_anchor`) over `hp.norm_anchor` of the spec's requests, evenly spaced, on the model as
    it is; None where the method has no such option or it is 0."""
    count = getattr(hp, "norm_anchor", 0)
    if not count:
        return None
    table = site_table(model)
    if not table.mlp_in_residual:
        raise SpecError("hyperparameters.norm_anchor", count, f"0 on {table.family} models, whose MLP output passes "
                        "a norm before it joins the residual stream (NAS rescales the MLP's value there)")
    n = len(spec.requests)
    chosen = [edit_request(spec.requests[i * n // min(count, n)]) for i in range(min(count, n))]
    return value_anchor(model, tokenizer, chosen, hp, templates)


def key_statistics(spec: EditSpec, model, tokenizer, layers) -> dict[int, torch.Tensor]:
    return second_moments(model, tokenizer, layers, corpus_texts(spec), max_tokens=spec.mom2_tokens,
                          corpus_name="files" if spec.corpus else "model-samples")


def resolve_edit_layers(spec: EditSpec, model, tokenizer) -> tuple[EditSpec, Located | None]:
    """`layer: auto` / `layers: auto` replaced by the layers a causal trace picks (see editors.locate)."""
    one = spec.method in ONE_LAYER_METHODS
    if (spec.layer if one else spec.layers) != "auto":
        return spec, None
    found = locate_layers(model, tokenizer, spec.requests, spec.locate, model_name=spec.model)
    return spec.model_copy(update={"layer": found.layer} if one else {"layers": found.layers}), found


class Editor:
    """Computes a spec's edit batch by batch, each batch on the model with the earlier ones applied.

    The model always holds exactly its base weights plus `stacked` (the concatenation of the batches'
    factors, one Delta), so a sequential run ends with the delta that reproduces it. The context
    templates are drawn once, on the unedited model (as ROME and MEMIT cache them); AlphaEdit's
    earlier keys (K_p K_pᵀ) carry over from batch to batch. `close()` restores the model.
    """

    def __init__(self, spec: EditSpec, model, tokenizer):
        if spec.layer == "auto" or spec.layers == "auto":
            raise ValueError("Editor needs resolved layers: call resolve_edit_layers(spec, model, tokenizer) first")
        n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        layers = spec.edit_layers
        if max(layers) >= n_layers:
            one = spec.method in ONE_LAYER_METHODS
            raise SpecError("layer" if one else "layers", spec.layer if one else list(spec.layers),
                            f"layers in [0, {n_layers - 1}] (the model has {n_layers})")
        self.spec, self.model, self.tokenizer = spec, model, tokenizer
        self.hp = hyperparameters(spec)
        needs = EDIT_METHODS[spec.method].statistics          # UltraEdit keeps neither statistics nor templates
        self.C = key_statistics(spec, model, tokenizer, layers) if needs else {}
        self.templates = context_templates(model, tokenizer, self.hp.context_templates, self.hp.seed) if needs else []
        self.previous: dict[int, torch.Tensor] = {}
        self.preserved = preservation(spec, model, tokenizer, self.templates, self.hp)
        self.anchor = anchoring(spec, model, tokenizer, self.templates, self.hp)
        self.projectors: dict = {}                   # AlphaEdit's null-space projectors, one per layer
        self.stacked: Delta | None = None
        self.details: list[dict] = []
        self.spec_dict = spec_to_dict(spec)

    def batch(self, requests: list[EditRequest]) -> Delta:
        """One batch's Delta, computed on the model as it is now (not applied), by the method's step."""
        delta, detail = STEPS[self.spec.method](self, requests)
        if self.hp.max_update_norm > 0:
            delta, detail["bounded"] = bound_update(self.model, delta, self.hp.max_update_norm)
        self.details.append(detail)
        return delta

    def step(self, requests: list[EditRequest]) -> Delta:
        """Compute one batch and add it to the model; returns the batch's own Delta."""
        delta = self.batch(requests)
        parts = [d for d in (self.stacked, delta) if d is not None]
        stacked = stack(self.model, parts, compact=True, method=self.spec.method, base_model=self.spec.model,
                        hyperparameters=delta.meta["hyperparameters"], spec=self.spec_dict)
        if self.stacked is not None:
            revert(self.model, self.stacked)
        apply(self.model, stacked)
        self.stacked = stacked
        return delta

    def restore(self, stacked: Delta, previous: dict[int, torch.Tensor], details: list[dict]) -> None:
        """Continue from a checkpoint: the model gets `stacked` (the earlier batches), AlphaEdit its keys."""
        apply(self.model, stacked)
        self.stacked, self.previous, self.details = stacked, dict(previous), list(details)

    def close(self) -> None:
        if self.stacked is not None:
            revert(self.model, self.stacked)


def bound_update(model, delta: Delta, bound: float) -> tuple[Delta, dict[str, float]]:
    """`delta` with each matrix's change scaled down, where needed, so that ‖ΔW‖_F ≤ `bound` · ‖W₀‖_F
    (W₀ the base weight); and ``{name: the scale}`` of those it scaled. The direction is kept."""
    scales = {name: bound / rel for name, rel in relative_norms(model, delta).items() if rel > bound}
    if not scales:
        return delta, {}
    factors = {n: (u * scales.get(n, 1.0), v) for n, (u, v) in delta.factors.items()}
    dense = {n: d * scales.get(n, 1.0) for n, d in delta.dense.items()}
    meta = delta.meta
    bounded = Delta.from_factors(model, factors, dense, method=meta["method"], base_model=meta["base_model"],
                                 hyperparameters=meta["hyperparameters"], spec=meta["spec"], metrics=meta["metrics"])
    return bounded, scales


def batches(requests: list, size: int) -> list[list]:
    return [requests[i:i + size] for i in range(0, len(requests), size)]


def compute_edit(spec: EditSpec, model, tokenizer, on_batch=None, resume=None) -> tuple[Delta, list[dict]]:
    """The spec's edit as one Delta (see `Editor`): ROME and r-ROME request by request, the batch methods
    all at once, or `sequential.batch_size` at a time. `on_batch(done, editor)` runs after each batch,
    with the edits so far applied. `resume`: ``(done, stacked, previous, details)`` of a checkpoint, to
    continue after its first `done` requests. The model is unchanged afterwards. `spec` must have its
    layers resolved (`resolve_edit_layers`)."""
    editor = Editor(spec, model, tokenizer)
    requests = [edit_request(r) for r in spec.requests]
    done = 0
    if resume is not None:
        done, stacked, previous, details = resume
        editor.restore(stacked, previous, details)
    try:
        for part in batches(requests[done:], batch_size(spec)):
            editor.step(part)
            done += len(part)
            if on_batch is not None:
                on_batch(done, editor)
    finally:
        editor.close()
    return editor.stacked, editor.details


def run_edit(spec: EditSpec, model, tokenizer, out: str | Path) -> dict:
    out = Path(out)
    seconds = {}
    start = time.perf_counter()
    spec, found = resolve_edit_layers(spec, model, tokenizer)
    if found is not None:
        found.result.save(out / "locate")
        seconds["locate"] = time.perf_counter() - start
    if spec.sequential is not None:
        report = run_sequential(spec, model, tokenizer, out, compute_edit)
        report.update(layers=delta_layers(spec), located=found.summary() if found else None,
                      seconds={**seconds, **report["seconds"]})
        (out / "metrics.json").write_text(json.dumps(report, indent=1))
        return report
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
    from interventions.lenses.steering import check_vector, load_vector, steering

    deltas = [load_delta(p) for p in spec.deltas]
    vector = load_vector(spec.steer) if spec.steer else None
    if vector is not None:
        check_vector(model, vector, (spec.coef,))
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
