"""MEMIT (Meng et al. 2023): many fact edits at once, spread over a range of MLP layers.

1. For each request, a target residual z_i at the last edit layer's block output,
   at the subject's last token: ROME's v* optimisation, on the block instead of the MLP.
2. For each layer l in order, with the earlier layers' updates in place:
   - K: the requests' keys at l, averaged over context templates;
   - R: (z − current residual) / (layers left);
   - ΔW_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹, the minimiser of ‖ΔW K − R‖² + λ tr(ΔW C_l ΔWᵀ).
3. The updates are reverted; the result is one Delta with rank ≤ n factors per layer.

>>> delta, details = compute_memit(model, tokenizer, requests, MemitHyperParams(layers=(2, 3, 4, 5, 6)),
...                                base_model="smollm2-135m")                                 # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from interventions.sites import site_table

from .delta import Delta, apply, revert
from interventions.prompts import pad_token_id, right_pad

from .rome import (EditRequest, RomeHyperParams, encode_at, hooked, is_conv1d, compute_k_star, compute_v_star,
                   context_templates, weight_name)
from .stats import second_moments


@dataclass(frozen=True)
class MemitHyperParams:
    """MEMIT's hyperparameters; defaults follow MEMIT's GPT-J settings where they carry over."""

    layers: tuple[int, ...]
    v_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    mom2_update_weight: float = 15_000.0
    context_templates: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    mom2_tokens: int = 20_000
    seed: int = 0

    def __post_init__(self):
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"`layers` must be a non-empty increasing list, got {list(self.layers)}")
        if self.mom2_update_weight < 0:
            raise ValueError(f"`mom2_update_weight` must be non-negative, got {self.mom2_update_weight}")

    def z_hyperparameters(self) -> RomeHyperParams:
        return RomeHyperParams(layer=self.layers[-1], v_steps=self.v_steps, v_lr=self.v_lr,
                               v_weight_decay=self.v_weight_decay, clamp_norm_factor=self.clamp_norm_factor,
                               kl_factor=self.kl_factor, context_templates=self.context_templates, seed=self.seed)


@torch.no_grad()
def block_outputs(model, tokenizer, layer: int, requests: list[EditRequest]) -> torch.Tensor:
    """Residual (block output) at each request's subject-last token on the plain prompt: [n, d]."""
    module = site_table(model).module(model, "block_output", layer)
    encoded = [encode_at(tokenizer, *r.text(), len(r.subject)) for r in requests]
    inputs = right_pad([ids for ids, _ in encoded], pad_token_id(tokenizer), next(model.parameters()).device)
    keep = {}
    with hooked(module, lambda m, a, out: keep.__setitem__("h", out[0] if isinstance(out, tuple) else out)):
        model(**inputs, use_cache=False)
    return keep["h"][torch.arange(len(encoded)), torch.tensor([i for _, i in encoded])].float()


def layer_update(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (R [out, n], Kᵀ(λC + KKᵀ)⁻¹ [n, in]) of ΔW = R Kᵀ (λC + KKᵀ)⁻¹; K: [in, n], R: [out, n]."""
    A = weight * C.double() + K.double() @ K.double().T
    right = torch.linalg.solve(A, K.double()).T          # A is symmetric: (A⁻¹K)ᵀ = KᵀA⁻¹
    return R.float(), right.float()


def compute_memit(model, tokenizer, requests: list[EditRequest], hp: MemitHyperParams, *, base_model: str,
                  C: dict[int, torch.Tensor] | None = None, corpus: list[str] | None = None,
                  spec: dict | None = None, z: torch.Tensor | None = None) -> tuple[Delta, dict]:
    """All `requests` in one Delta; the model is unchanged afterwards. `z` (``[n, d]``): targets
    from an earlier call's details, to try other layer hyperparameters without re-optimising them."""
    table = site_table(model)
    n_layers = table.num_layers(model)
    if hp.layers[0] < 0 or hp.layers[-1] >= n_layers:
        raise ValueError(f"`layers`: got {list(hp.layers)}; expected layers in [0, {n_layers - 1}]")
    C = dict(C or {})
    missing = [layer for layer in hp.layers if layer not in C]
    if missing:
        C.update(second_moments(model, tokenizer, missing, corpus, max_tokens=hp.mom2_tokens))
    was_training = model.training
    steps, factors, info = [], {}, []
    try:
        model.eval()
        templates = context_templates(model, tokenizer, hp.context_templates, hp.seed)
        z_hp = hp.z_hyperparameters()
        if z is None:
            z = torch.stack([compute_v_star(model, tokenizer, hp.layers[-1], r, templates, z_hp,
                                            site="block_output")[0] for r in requests])
        for i, layer in enumerate(hp.layers):
            K = torch.stack([compute_k_star(model, tokenizer, layer, r, templates) for r in requests], dim=1)
            current = block_outputs(model, tokenizer, hp.layers[-1], requests)
            R = (z - current).T / (len(hp.layers) - i)
            u, v = layer_update(K.cpu(), R.cpu(), C[layer].cpu(), hp.mom2_update_weight)
            module = table.module(model, "mlp_key", layer)
            pair = (v.T, u.T) if is_conv1d(module) else (u, v)
            name = weight_name(model, layer)
            step = Delta.from_factors(model, {name: pair}, method="memit-step", base_model=base_model)
            apply(model, step)
            steps.append(step)
            factors[name] = pair
            info.append({"layer": layer, "residual_norm": float(R.norm(dim=0).mean() * (len(hp.layers) - i))})
    finally:
        revert(model, *steps)
        model.train(was_training)
    hyper = {**asdict(hp), "layers": list(hp.layers), "context_templates": [list(x) for x in hp.context_templates]}
    delta = Delta.from_factors(model, factors, method="memit", base_model=base_model, hyperparameters=hyper,
                               spec=spec or {"requests": [asdict(r) for r in requests]})
    return delta, {"z": z, "layers": info, "templates": templates}
