"""MEMIT (Meng et al. 2023): many fact edits at once, spread over a range of MLP layers.

1. For each request, a target residual z_i at the last edit layer's block output,
   at the subject's last token: ROME's v* optimisation, on the block instead of the MLP.
2. For each layer l in order, with the earlier layers' updates in place:
   - K: the requests' keys at l, averaged over context templates;
   - R: (z − current residual) / (layers left);
   - ΔW_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹, the minimiser of ‖ΔW K − R‖² + λ tr(ΔW C_l ΔWᵀ).
3. The updates are reverted; the result is one Delta with rank ≤ n factors per layer.

ENCORE (Gupta et al. 2025) is MEMIT with two regularisers: the target optimisation stops as soon as the
target is the top-1 prediction at every prompt row (most-probable early stopping, `early_stop: mpes`),
and each layer's objective gains μ‖ΔW‖²_F (`norm_penalty`), which bounds the update's Frobenius norm.
Either can be set on MEMIT and AlphaEdit too (AlphaEdit's ridge l2 already is such a term; μ adds to it).

AlphaEdit (Fang et al. 2025) is the same loop with step 2's update replaced by one projected onto
the null space of the layer's preserved keys (`projected_update`), and, in sequential editing, the
keys of earlier batches kept as constraints too.

Preserved keys (`preserve_from`, Lesion's own option for all three): the keys of subjects that are not
edited, at their subjects' last tokens, enter every layer's objective as w‖ΔW K_s‖² (w: `preserve_scale`).
A batch of counterfactual "city X is in Asia" edits otherwise moves the answers of unedited cities too,
mostly to the batch's new targets: the shared direction of the subjects' keys carries the relation's
rewrite (editors/README.md, "Lifelong editing").

Norm-anchor scaling (NAS, Liu et al. 2026; `norm_anchor`, for all three): sequential edits feed back through
the MLP's value at the subject (a grown weight gives larger values, whose targets grow the weight further).
NAS breaks the loop by rescaling every solved value v* = v0 + δ to one norm taken on the unedited model, and
by leaving unedited a request whose v* is over twice that norm.

>>> delta, details = compute_memit(model, tokenizer, requests, MemitHyperparameters(layers=(2, 3, 4, 5, 6)),
...                                base_model="smollm2-135m")                                 # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch

from editors.delta import Delta, apply, revert
from editors.methods.rome import (
    EditRequest,
    as_factors,
    compute_keys,
    compute_targets,
    context_templates,
    encode_at,
    hooked,
    weight_name,
)
from editors.stats import second_moments
from interventions.core.prompts import pad_token_id, right_pad
from interventions.core.runtime import eval_mode
from interventions.models.sites import site_table
from interventions.spec import AlphaEditHyperparameters, EncoreHyperparameters, MemitHyperparameters

#: NAS's constants (Liu et al. 2026): the anchor drops the largest 5% of the solved values' norms, and a value
#: over twice the anchor is not applied.
ANCHOR_TRIM, ANCHOR_SKIP = 0.05, 2.0


@torch.no_grad()
def outputs_at(model, tokenizer, layer: int, requests: list[EditRequest], site: str = "block_output") -> torch.Tensor:
    """`site`'s output (default: the residual after block `layer`) at each request's subject-last token on the
    plain prompt: [n, d]."""
    module = site_table(model).module(model, site, layer)
    encoded = [encode_at(tokenizer, *r.text(), len(r.subject)) for r in requests]
    inputs = right_pad([ids for ids, _ in encoded], pad_token_id(tokenizer), next(model.parameters()).device)
    keep = {}
    with hooked(module, lambda m, a, out: keep.__setitem__("h", out[0] if isinstance(out, tuple) else out)):
        model(**inputs, use_cache=False)
    return keep["h"][torch.arange(len(encoded)), torch.tensor([i for _, i in encoded])].float()


def trimmed_mean(values: torch.Tensor, trim: float = ANCHOR_TRIM) -> float:
    """The mean of `values` without its largest ⌊trim · n⌋ (NAS's anchor statistic)."""
    kept = values.double().sort().values[: len(values) - math.floor(trim * len(values))]
    return float(kept.mean())


def anchored(z: torch.Tensor, init: torch.Tensor, v0: torch.Tensor, anchor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NAS's rescaling of solved targets: ``(z', skipped)``. A target z (block output) moves the MLP's value at
    the subject from v0 to v* = v0 + (z − init); v* is rescaled to norm `anchor`, or, where ‖v*‖ is over
    `ANCHOR_SKIP` times the anchor, left at v0 (that request is not edited: z' = init)."""
    value = v0 + (z - init)
    norm = value.norm(dim=1, keepdim=True)
    skipped = norm[:, 0] > ANCHOR_SKIP * anchor
    value = torch.where(skipped[:, None], v0, value * (anchor / norm))
    return init - v0 + value, skipped


def values(model, tokenizer, requests: list[EditRequest], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(init, v0): the residual after block `layer` and the MLP's output there, at each request's subject."""
    return outputs_at(model, tokenizer, layer, requests), outputs_at(model, tokenizer, layer, requests, "mlp_output")


def batch_targets(model, tokenizer, requests: list[EditRequest], templates: list[str], hp: MemitHyperparameters,
                  anchor: float | None) -> tuple[torch.Tensor, int]:
    """The targets z at the last edited layer's block output (`compute_targets`), rescaled to NAS's `anchor`
    when one is given (`anchored`); and how many requests the anchor leaves unedited."""
    z, _ = compute_targets(model, tokenizer, hp.layers[-1], requests, templates, hp.z_hyperparameters(),
                           site="block_output")
    if anchor is None:
        return z, 0
    z, skipped = anchored(z, *values(model, tokenizer, requests, hp.layers[-1]), anchor)
    return z, int(skipped.sum())


def value_anchor(model, tokenizer, requests: list[EditRequest], hp: MemitHyperparameters,
                 templates: list[str]) -> float:
    """NAS's anchor on the model as it is (the unedited one): the trimmed mean of ‖v*‖ = ‖v0 + (z − init)‖ over
    the targets z solved for `requests` (`trimmed_mean`)."""
    with eval_mode(model):
        z, _ = batch_targets(model, tokenizer, requests, templates, hp, None)
        init, v0 = values(model, tokenizer, requests, hp.layers[-1])
    return trimmed_mean((v0 + z - init).norm(dim=1))


def layer_update(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, weight: float,
                 norm_penalty: float = 0.0, preserved: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (R [out, n], Kᵀ(λC + KKᵀ + S + μI)⁻¹ [n, in]) of ΔW = R Kᵀ (λC + KKᵀ + S + μI)⁻¹, the minimiser
    of ‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ) + tr(ΔW S ΔWᵀ) + μ‖ΔW‖²_F; K: [in, n], R: [out, n]. μ (`norm_penalty`) is
    ENCORE's Frobenius norm constraint (MEMIT has μ = 0); S (`preserved`, default 0) is w K_s K_sᵀ of keys
    the update must leave alone (`preserve_from`), so the term is w‖ΔW K_s‖²."""
    A = weight * C.double() + K.double() @ K.double().T
    A = A + norm_penalty * torch.eye(A.shape[0], dtype=A.dtype)
    if preserved is not None:
        A = A + preserved.double()
    right = torch.linalg.solve(A, K.double()).T          # A is symmetric: (A⁻¹K)ᵀ = KᵀA⁻¹
    return R.float(), right.float()


def null_space_projector(C: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """P = U Uᵀ over the eigenvectors of C whose eigenvalues are below `threshold` (AlphaEdit's P):
    the directions the preserved keys (whose second moment C is) hardly use; ``(P, their number)``."""
    values, vectors = torch.linalg.eigh(C.double())
    U = vectors[:, values < threshold]
    return U @ U.T, U.shape[1]


def projected_update(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, previous: torch.Tensor,
                     l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's update as factors (R [out, n], (A⁻¹PK)ᵀ [n, in]) of
    ``ΔW = R Kᵀ P A⁻¹``, ``A = P (K Kᵀ + K_p K_pᵀ) P + l2 I``: the minimiser of ‖ΔW K − R‖² + ‖ΔW K_p‖²
    + l2 ‖ΔW‖² over updates in the null space (ΔW = ΔW P). `previous` is K_p K_pᵀ, the keys of earlier
    sequential batches. With l2 > 0, A⁻¹PK lies in P's range, so ΔW sends every preserved key
    (PK₀ ≈ 0) to (almost) zero."""
    K, P, previous = K.double(), P.double(), previous.double()
    A = P @ (K @ K.T + previous) @ P + l2 * torch.eye(P.shape[0], dtype=P.dtype)
    return R.float(), torch.linalg.solve(A, P @ K).T.float()          # A is symmetric: (A⁻¹PK)ᵀ = KᵀPA⁻¹


def method_name(hp) -> str:
    """The method a MEMIT-family hyperparameter object stands for."""
    return {AlphaEditHyperparameters: "alphaedit", EncoreHyperparameters: "encore"}.get(type(hp), "memit")


def compute_memit(model, tokenizer, requests: list[EditRequest], hp: MemitHyperparameters, *, base_model: str,
                  C: dict[int, torch.Tensor] | None = None, corpus: list[str] | None = None,
                  spec: dict | None = None, z: torch.Tensor | None = None, templates: list[str] | None = None,
                  previous: dict[int, torch.Tensor] | None = None,
                  projectors: dict[int, tuple[torch.Tensor, int]] | None = None,
                  preserved: dict[int, torch.Tensor] | None = None, anchor: float | None = None) -> tuple[Delta, dict]:
    """All `requests` in one Delta (MEMIT, or AlphaEdit when `hp` is `AlphaEditHyperparameters`); the model
    is unchanged afterwards. `z` (``[n, d]``): targets from an earlier call's details, to try other
    layer hyperparameters without re-optimising them. `templates`: context templates drawn earlier.
    AlphaEdit's `previous`: per layer, K_p K_pᵀ of the keys edited by earlier batches (details'
    ``keys_outer`` gives this batch's, to add for the next); `projectors`: a dict the null-space
    projectors are kept in per layer, so that a sequential run computes each once (C is fixed). `preserved`:
    per layer, w K_s K_sᵀ of keys every update must leave alone (`preserved_keys`), a term w‖ΔW K_s‖² in each
    layer's objective (AlphaEdit: beside K_p K_pᵀ). `anchor`: NAS's norm (`value_anchor`) the targets are
    rescaled to; details' ``anchor_skipped`` counts the requests it leaves unedited."""
    table = site_table(model)
    n_layers = table.num_layers(model)
    if hp.layers[0] < 0 or hp.layers[-1] >= n_layers:
        raise ValueError(f"`layers`: got {list(hp.layers)}; expected layers in [0, {n_layers - 1}]")
    alpha = isinstance(hp, AlphaEditHyperparameters)
    C = dict(C or {})
    missing = [layer for layer in hp.layers if layer not in C]
    if missing:
        C.update(second_moments(model, tokenizer, missing, corpus, max_tokens=hp.mom2_tokens))
    steps, factors, info, outer, skipped = [], {}, [], {}, 0
    projectors, preserved = ({} if projectors is None else projectors), preserved or {}
    with eval_mode(model):
        try:
            if templates is None:
                templates = context_templates(model, tokenizer, hp.context_templates, hp.seed)
            if z is None:
                z, skipped = batch_targets(model, tokenizer, requests, templates, hp, anchor)
            for i, layer in enumerate(hp.layers):
                K = compute_keys(model, tokenizer, layer, requests, templates).T.cpu()
                current = outputs_at(model, tokenizer, hp.layers[-1], requests)
                R = (z - current).T.cpu() / (len(hp.layers) - i)
                name = weight_name(model, layer)
                row = {"layer": layer, "residual_norm": float(R.norm(dim=0).mean() * (len(hp.layers) - i))}
                if alpha:
                    if layer not in projectors:
                        projectors[layer] = null_space_projector(C[layer].cpu(), hp.nullspace_threshold)
                    P, kept = projectors[layer]
                    before = (previous or {}).get(layer, torch.zeros(K.shape[0], K.shape[0])) + preserved.get(layer, 0)
                    pair = as_factors(model, layer, *projected_update(K, R, P, before, hp.l2 + hp.norm_penalty))
                    outer[layer] = (K.double() @ K.double().T).float()
                    row["null_space_dims"] = kept
                else:
                    pair = as_factors(model, layer, *layer_update(K, R, C[layer].cpu(), hp.mom2_update_weight,
                                                                  hp.norm_penalty, preserved.get(layer)))
                factors[name] = pair
                step = Delta.from_factors(model, {name: pair}, method="update-step", base_model=base_model)
                apply(model, step)
                steps.append(step)
                info.append(row)
        finally:
            revert(model, *steps)
    delta = Delta.from_factors(model, factors, method=method_name(hp), base_model=base_model,
                               hyperparameters=hp.recorded(), spec=spec or {"requests": [asdict(r) for r in requests]})
    return delta, {"z": z, "layers": info, "templates": templates, "keys_outer": outer, "anchor_skipped": skipped}


@torch.no_grad()
def preserved_keys(model, tokenizer, layers: list[int], requests: list[EditRequest], templates: list[str],
                   weight: float) -> dict[int, torch.Tensor]:
    """Per layer, w K_s K_sᵀ over the keys of `requests`' subjects (each at its subject's last token, averaged
    over `templates`, as an edit's own keys are): the `preserved` term of `compute_memit`."""
    out = {}
    for layer in layers:
        K = compute_keys(model, tokenizer, layer, requests, templates).double()
        out[layer] = (weight * K.T @ K).float().cpu()
    return out


def memit_step(editor, requests: list[EditRequest]):
    """The `Editor`'s step for MEMIT and AlphaEdit: the whole batch over `spec.layers`; the batch's keys are
    added to the earlier ones (AlphaEdit's K_p K_pᵀ), and the null-space projectors are kept. With NAS's anchor,
    the details give it and how many of the batch's requests it left unedited."""
    delta, info = compute_memit(editor.model, editor.tokenizer, requests, editor.hp, C=editor.C,
                                previous=editor.previous, projectors=editor.projectors, preserved=editor.preserved,
                                anchor=editor.anchor, base_model=editor.spec.model, templates=editor.templates)
    for layer, outer in info["keys_outer"].items():
        editor.previous[layer] = editor.previous.get(layer, 0) + outer
    detail = {"requests": len(requests), "layers": info["layers"]}
    if editor.anchor is not None:
        detail.update(anchor=editor.anchor, anchor_skipped=info["anchor_skipped"])
    return delta, detail
