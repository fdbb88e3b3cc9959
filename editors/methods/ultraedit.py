"""UltraEdit (Gu et al. 2025): lifelong editing in closed form, with no target optimisation, no key
statistics and no store of earlier edits beyond running feature statistics.

For a batch of requests, one forward and backward pass of the model as it is now gives, at each edited
layer's MLP output projection and at each answer-token position i (the edit prompt with the answer
teacher-forced; the loss is each request's mean answer-token cross-entropy, summed over requests):

- k_i, the projection's input (the key), and
- g_i, the gradient of the loss with respect to the projection's output.

**Lifelong normalisation.** Running statistics of every key and gradient the run has seen, this
batch's included (the sums are updated first, so the first batch is normalised by its own), live in
``editor.previous`` (one vector per layer: count, Σz, Σz² of z = [k ‖ g]), so a checkpoint carries them
and a resumed run continues exactly. Both halves are standardised, k̂ = (k − μ_k) / (σ_k + ε) and
ĝ = (g − μ_g) / (σ_g + ε).

**Update.** Each answer token's pseudo-value is the normalised descent step v = −η ‖k̂‖² ĝ. The layer's
change is the ridge regression from the *raw* keys K [m, in] to V [m, out], ‖K ΔWᵀ − V‖² + λ‖ΔW‖²_F,
whose closed form ΔW = Vᵀ (KKᵀ + λI)⁻¹ K is kept as rank-≤m factors (m: the batch's answer tokens; the
primal form (KᵀK + λI)⁻¹KᵀV is the same matrix). The normalisation sets only the size and direction of
the steps; the keys the layer is fitted on are the ones it sees. Every layer's update comes from the one
pass; they are applied together. η is `lr`, λ is `ridge` (1 in the paper's code).

This is the published method as its authors' released implementation computes it. An earlier version of Lesion fitted the
regression on normalised keys and mapped it back to raw ones; on SmolLM2 it either collapsed the model
or barely edited (editors/README.md, "Lifelong editing").

>>> ultraedit_update(K, pseudo_values(K, G, running_sums(torch.cat([K, G], 1)), lr=1e-3), ridge=1.0)  # doctest: +SKIP
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict

import torch

from editors.delta import Delta
from editors.methods.rome import EditRequest, as_factors, frozen_parameters, hooked, weight_name
from interventions.core.errors import SpecError
from interventions.core.prompts import pad_token_id, right_pad
from interventions.core.runtime import eval_mode
from interventions.models.sites import site_table

#: ε of the standardisation.
EPSILON = 1e-6


def running_sums(z: torch.Tensor) -> torch.Tensor:
    """The additive statistics of rows `z` [m, d]: ``[count, Σz (d), Σz² (d)]`` (float64)."""
    z = z.double()
    return torch.cat([torch.tensor([float(len(z))], dtype=torch.float64), z.sum(0), (z * z).sum(0)])


def moments(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, standard deviation) per feature, from `sums` (`running_sums` added up)."""
    d = (len(sums) - 1) // 2
    n, total, squares = sums[0], sums[1:1 + d], sums[1 + d:]
    mean = total / n
    return mean, (squares / n - mean * mean).clamp_min(0).sqrt()


def pseudo_values(K: torch.Tensor, G: torch.Tensor, sums: torch.Tensor, *, lr: float) -> torch.Tensor:
    """V [m, out]: rows −lr ‖k̂‖² ĝ, for keys `K` [m, in] and gradients `G` [m, out] standardised by the
    running statistics `sums` of z = [k ‖ g] (`running_sums`, added up)."""
    mean, std = moments(sums)
    d = K.shape[1]
    K_hat = (K.double() - mean[:d]) / (std[:d] + EPSILON)
    G_hat = (G.double() - mean[d:]) / (std[d:] + EPSILON)
    return -lr * (K_hat * K_hat).sum(1, keepdim=True) * G_hat


def ultraedit_update(K: torch.Tensor, V: torch.Tensor, *, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (Vᵀ [out, m], (KKᵀ + λI)⁻¹K [m, in]) of ΔW = Vᵀ (KKᵀ + λI)⁻¹ K, the minimiser of
    ‖K ΔWᵀ − V‖² + λ‖ΔW‖²_F for raw keys `K` [m, in] and pseudo-values `V` [m, out]."""
    K = K.double()
    A = K @ K.T + ridge * torch.eye(K.shape[0], dtype=K.dtype)
    return V.double().T.float(), torch.linalg.solve(A, K).float()


def answer_rows(tokenizer, requests: list[EditRequest]) -> tuple[list[list[int]], list[tuple[int, int, int]]]:
    """Each request's edit prompt with its answer appended (teacher-forced), and ``(row, position, token)``
    for every answer token: the position whose next-token prediction is that token."""
    seqs, answers = [], []
    for row, request in enumerate(requests):
        text, _ = request.text()
        ids = tokenizer(text)["input_ids"]
        target = tokenizer(request.target_new, add_special_tokens=False)["input_ids"]
        seqs.append(ids + target[:-1])
        answers += [(row, len(ids) - 1 + j, tok) for j, tok in enumerate(target)]
    return seqs, answers


def keys_and_gradients(model, tokenizer, layers: list[int], requests: list[EditRequest]) -> dict:
    """``{layer: (K [m, in], G [m, out])}``: the edited projections' inputs at the answer tokens and the
    loss gradient at their outputs, from one forward and backward pass of the model as it is now."""
    table = site_table(model)
    modules = {layer: table.module(model, "mlp_key", layer) for layer in layers}
    seqs, answers = answer_rows(tokenizer, requests)
    device = next(model.parameters()).device
    rows, at, tokens = (torch.tensor(x, device=device) for x in zip(*answers))
    seen = {}

    def keep(layer):
        return lambda m, args, out: seen.__setitem__(layer, (args[0], out))

    with frozen_parameters(model), torch.enable_grad():
        for module in modules.values():
            module.weight.requires_grad_(True)         # so that the outputs carry a gradient (no weight grads are asked)
        last = table.module(model, "block_output", table.num_layers(model) - 1)
        with ExitStack() as stack:
            for layer, module in modules.items():
                stack.enter_context(hooked(module, keep(layer)))
            stack.enter_context(hooked(last, lambda m, a, out: seen.__setitem__("last", out[0] if isinstance(
                out, tuple) else out)))
            model(**right_pad(seqs, pad_token_id(tokenizer), device), use_cache=False, logits_to_keep=1)
        # the vocabulary projection only where the loss reads it (the answer positions)
        logits = table.readout(model)(seen["last"][rows, at])
        logp = logits.float().log_softmax(-1).gather(1, tokens[:, None])[:, 0]
        counts = torch.zeros(len(seqs), device=device).index_add(0, rows, torch.ones_like(logp))
        loss = -(logp / counts[rows]).sum()
        outs = [seen[layer][1] for layer in layers]
        grads = torch.autograd.grad(loss, outs)
    return {layer: (seen[layer][0][rows, at].detach().float().cpu(), g[rows, at].float().cpu())
            for layer, g in zip(layers, grads)}


def compute_ultraedit(model, tokenizer, requests: list[EditRequest], hp, *, base_model: str,
                      sums: dict[int, torch.Tensor] | None = None, spec: dict | None = None) -> tuple[Delta, dict]:
    """One UltraEdit batch: ``(Delta, details)``; the model is left unchanged. `sums`: per layer, the
    running statistics of the batches before (`running_sums`, added up); ``details["sums"]`` holds them
    with this batch's added, for the next."""
    with eval_mode(model):
        found = keys_and_gradients(model, tokenizer, list(hp.layers), requests)
    seen = len(next(iter(found.values()))[0]) + float((sums or {}).get(hp.layers[0], torch.zeros(1))[0])
    if seen < 2:
        raise SpecError("requests", f"{len(requests)} request(s) with {int(seen)} answer token(s)",
                        "at least two answer tokens in UltraEdit's first batch: it standardises each key and gradient "
                        "by the statistics of the edits so far, and one row has no spread (it would edit nothing)")
    factors, rows, after = {}, [], {}
    for layer, (K, G) in found.items():
        after[layer] = (sums or {}).get(layer, 0) + running_sums(torch.cat([K, G], 1))
        u, v = ultraedit_update(K, pseudo_values(K, G, after[layer], lr=hp.lr), ridge=hp.ridge)
        factors[weight_name(model, layer)] = as_factors(model, layer, u, v)
        rows.append({"layer": layer, "answer_tokens": len(K), "gradient_norm": float(G.norm(dim=1).mean())})
    delta = Delta.from_factors(model, factors, method="ultraedit", base_model=base_model,
                               hyperparameters=hp.recorded(), spec=spec or {"requests": [asdict(r) for r in requests]})
    return delta, {"layers": rows, "sums": after}


def ultraedit_step(editor, requests: list[EditRequest]):
    """The `Editor`'s step for UltraEdit: one batch over `spec.layers`, the running statistics kept in
    ``editor.previous`` (so that a checkpoint carries them)."""
    delta, info = compute_ultraedit(editor.model, editor.tokenizer, requests, editor.hp, base_model=editor.spec.model,
                                    sums=editor.previous)
    editor.previous.update(info["sums"])
    return delta, {"requests": len(requests), "layers": info["layers"]}
