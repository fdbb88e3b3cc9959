"""EMMET (Gupta et al., EMNLP 2024 Findings): ROME's rank-one edit generalised to a batch, with
equality constraints.

For a batch of n requests at one layer, with keys K = [k*_1 … k*_n] (each averaged over the
context templates, as r-ROME) and targets V = [v*_1 … v*_n] (ROME's v* optimisation, all
requests optimised together), EMMET solves

    min tr(ΔW C ΔWᵀ)  subject to  (W + ΔW) K = V,

whose closed form is ``ΔW = (V − W K) (Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹``: for n = 1 exactly r-ROME's update.
Two requests with the same key (one subject, two relations, same prefix) make Kᵀ C⁻¹ K singular;
`equality_ridge` (× its mean diagonal) then trades the equalities for a least-squares fit, as
EMMET's own regularisation of that matrix does.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from editors.delta import Delta
from editors.methods.rome import (
    EditRequest,
    as_factors,
    compute_keys,
    compute_targets,
    context_templates,
    weight_matrix,
    weight_name,
)
from editors.stats import second_moment
from interventions.spec import EmmetHyperparameters


def equality_update(W: torch.Tensor, C: torch.Tensor, K: torch.Tensor, V: torch.Tensor, *, ridge: float = 0.0,
                    mom2_ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (Λ [out, n], (C⁻¹K)ᵀ [n, in]) of ``ΔW = (V − W K)(Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹``; W [out, in],
    K [in, n], V [out, n]. `mom2_ridge` regularises C as ROME does (× its mean eigenvalue)."""
    C, K, V, W = C.double(), K.double(), V.double(), W.double()
    C = C + mom2_ridge * torch.trace(C) / C.shape[0] * torch.eye(C.shape[0], dtype=C.dtype)
    CK = torch.linalg.solve(C, K)                                 # C⁻¹K [in, n]
    G = K.T @ CK                                                  # Kᵀ C⁻¹ K [n, n]
    G = G + ridge * torch.trace(G) / G.shape[0] * torch.eye(G.shape[0], dtype=G.dtype)
    lam = torch.linalg.solve(G, (V - W @ K).T).T                  # G symmetric: (V − WK) G⁻¹
    return lam.float(), CK.T.float()


def compute_emmet(model, tokenizer, requests: list[EditRequest], hp: EmmetHyperparameters, *, base_model: str,
                  C: torch.Tensor | None = None, corpus: list[str] | None = None, spec: dict | None = None,
                  templates: list[str] | None = None) -> tuple[Delta, dict]:
    """One EMMET batch: ``(rank-n Delta, details)``; the model is left unchanged."""
    from interventions.core.runtime import eval_mode

    with eval_mode(model):
        if templates is None:
            templates = context_templates(model, tokenizer, hp.context_templates, hp.seed)
        K = compute_keys(model, tokenizer, hp.layer, requests, templates)
        V, info = compute_targets(model, tokenizer, hp.layer, requests, templates, hp)
        if C is None:
            C = second_moment(model, tokenizer, hp.layer, corpus, max_tokens=hp.mom2_tokens)
    lam, right = equality_update(weight_matrix(model, hp.layer), C.cpu(), K.T.cpu(), V.T.cpu(),
                                 ridge=hp.equality_ridge, mom2_ridge=hp.mom2_ridge)
    delta = Delta.from_factors(model, {weight_name(model, hp.layer): as_factors(model, hp.layer, lam, right)},
                               method="emmet", base_model=base_model, hyperparameters=hp.recorded(),
                               spec=spec or {"requests": [asdict(r) for r in requests]})
    return delta, {"K": K, "V": V, "templates": templates, **info}


def emmet_step(editor, requests: list[EditRequest]):
    """The `Editor`'s step for EMMET: the whole batch at `spec.layer`."""
    spec = editor.spec
    delta, info = compute_emmet(editor.model, editor.tokenizer, requests, editor.hp, C=editor.C[spec.layer],
                                base_model=spec.model, templates=editor.templates)
    return delta, {"requests": len(requests), "final_nll": info["final_nll"]}
