"""Closed-form concept erasure and remapping in text-to-image models (UCE, TIME, Diff-QuickFix).

Every edit here solves one ridge regression per projection ``W`` (out x d):

    W' = argmin  sum_e |W' c_e - W c*_e|^2  +  s * sum_p |W' c_p - W c_p|^2  +  lam * |W' - W|^2
       = (lam W + sum_e W c*_e c_e^T + s sum_p W c_p c_p^T) (lam I + sum_e c_e c_e^T + s sum_p c_p c_p^T)^-1

- ``c_e``: the inputs of the projection where the concept is (erase set), ``c*_e``: the inputs at the
  aligned positions of the guide prompt, so that ``W' c_e`` becomes what ``W`` made of the guide;
- ``c_p``: the inputs of the preserved concepts (UCE's preserve term; TIME has none).

So the change is ``W' - W = W (C* - C)^T C M^-1`` with ``C`` the erase inputs as rows and ``M``
the matrix inverted above: its rank is at most the number of erase inputs, and the Delta stores
it as factors ``u = W (C* - C)^T``, ``v = C M^-1`` (UCE, Gandikota et al. 2024; TIME, Orgad et al. 2023).

Where the inputs come from (`EraseSpec.edit`):
- ``cross_attention``: every UNet ``attn2.to_k`` / ``attn2.to_v``; the inputs are the text
  encoder's output embeddings of ``template.format(concept)`` at the concept's tokens and every
  token after it (CLIP's causal mask carries the concept into them; the UNet attends to all of them);
- ``text_encoder``: the self-attention output projection of text layer `layer` (Diff-QuickFix,
  Basu et al. 2023); the inputs are that projection's inputs at the same positions.

>>> spec = parse_spec({"kind": "erase", "concepts": [{"concept": "red", "guide": "blue"}],
...                    "preserve": ["green", "yellow"], "templates": ["a {} circle"]})      # doctest: +SKIP
>>> delta, report = erase(spec, load_pipeline(spec.model))                               # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from editors.delta import Delta
from interventions.diffusion import DiffusionPipe, DiffusionSites
from interventions.diffusion_trace import subject_positions
from interventions.errors import SpecError
from interventions.pv import CollectStates, build_graph
from interventions.spec import spec_to_dict

log = logging.getLogger(__name__)


@dataclass
class EditSets:
    """Rows of projection inputs: ``erase`` [n_e, d] with their ``guide`` [n_e, d], and ``preserve`` [n_p, d]."""

    erase: torch.Tensor
    guide: torch.Tensor
    preserve: torch.Tensor


def fill(template: str, concept: str) -> str:
    return " ".join(template.format(concept).split())


def aligned_positions(pipe: DiffusionPipe, template: str, concept: str, guide: str, field: str):
    """[(concept position, guide position)] from the concept's first token to the end of the context.

    The concept's span maps onto the guide's span (its last token when the guide is shorter, the
    token after the prefix when the guide is empty); later tokens map to their shifted partners."""
    prompt, other = fill(template, concept), fill(template, guide)
    span = subject_positions(pipe, prompt, concept, field)
    length = pipe.tokenizer.model_max_length
    p, k = span[0], len(span)
    if guide:
        gspan = subject_positions(pipe, other, guide, field.replace("concept", "guide"))
        pg, kg = gspan[0], len(gspan)
    else:
        pg, kg = p, 0
    pairs = []
    for q in range(p, length):
        if q < p + k:
            g = pg + min(q - p, kg - 1) if kg else pg
        else:
            g = q - k + kg
        pairs.append((q, min(g, length - 1)))
    return prompt, other, pairs


def _inputs(pipe: DiffusionPipe, prompts: list[str], edit: str, layer: int | None) -> torch.Tensor:
    """``Float[Tensor, "prompts L d"]``: what the edited projections read, for each token."""
    if edit == "cross_attention":
        return pipe.encode(prompts)
    path = DiffusionSites(pipe).text("text_attention_out", layer) + ".input"
    graph = build_graph(pipe.text_encoder, [(path, CollectStates())])
    ids = pipe.tokenize(prompts)
    L = ids.shape[1]
    with torch.no_grad():
        (_, states), _ = graph(base={"input_ids": ids}, unit_locations={"base": [[list(range(L))] * len(prompts)]})
    return states[0]


def edit_sets(spec, pipe: DiffusionPipe) -> EditSets:
    """The erase, guide and preserve inputs of every concept x template."""
    erase, guide, preserve = [], [], []
    for i, c in enumerate(spec.concepts):
        for t in spec.templates:
            prompt, other, pairs = aligned_positions(pipe, t, c.concept, c.guide, f"concepts[{i}].concept")
            x = _inputs(pipe, [prompt, other], spec.edit, spec.layer)
            erase += [x[0, q] for q, _ in pairs]
            guide += [x[1, g] for _, g in pairs]
    for j, word in enumerate(spec.preserve):
        for t in spec.templates:
            prompt = fill(t, word)
            start = subject_positions(pipe, prompt, word, f"preserve[{j}]")[0]
            x = _inputs(pipe, [prompt], spec.edit, spec.layer)[0]
            preserve += list(x[start:])
    d = erase[0].shape[-1]
    stack = (lambda rows: torch.stack(rows).double() if rows else torch.zeros(0, d, dtype=torch.float64))
    return EditSets(stack(erase), stack(guide), stack(preserve))


def closed_form(weight: torch.Tensor, sets: EditSets, lam: float, preserve_scale: float):
    """Factors ``(u [out, n_e], v [n_e, d])`` of ``W' - W`` for one projection (float64 solve)."""
    W = weight.detach().double().cpu()
    C, G, P = sets.erase, sets.guide, sets.preserve
    M = lam * torch.eye(W.shape[1], dtype=torch.float64) + C.T @ C + preserve_scale * P.T @ P
    u = W @ (G - C).T                                  # [out, n_e]
    v = torch.linalg.solve(M, C.T).T                   # C M^-1 (M is symmetric)
    return u, v


def compress(u: torch.Tensor, v: torch.Tensor, tol: float = 1e-7):
    """The same product at its numerical rank (SVD), as float32 factors; dense when that is no smaller."""
    U, S, Vh = torch.linalg.svd(u @ v, full_matrices=False)
    r = int((S > tol * S[0]).sum()) if len(S) and S[0] > 0 else 0
    r = max(r, 1)
    if r * (u.shape[0] + v.shape[1]) >= u.shape[0] * v.shape[1]:
        return None, (u @ v).float()
    return ((U[:, :r] * S[:r]).float(), Vh[:r].float()), None


def projections(spec, pipe: DiffusionPipe) -> list[str]:
    sites = DiffusionSites(pipe)
    if spec.edit == "cross_attention":
        return sites.projections()
    if spec.layer >= sites.text_layers:
        raise SpecError("layer", spec.layer, f"a text-encoder layer in 0..{sites.text_layers - 1}")
    path = sites.text("text_attention_out", spec.layer).replace("[", ".").replace("]", "")
    return [f"text_encoder.{path}.weight"]


def erase(spec, pipe: DiffusionPipe) -> Delta:
    """The edit of `spec` as a Delta against `pipe` (which is left unchanged)."""
    sets = edit_sets(spec, pipe)
    params = dict(pipe.named_parameters())
    factors, dense = {}, {}
    for name in projections(spec, pipe):
        u, v = closed_form(params[name], sets, spec.lam, spec.preserve_scale if spec.method == "uce" else 0.0)
        f, d = compress(u, v)
        if f is not None:
            factors[name] = f
        else:
            dense[name] = d
    hyper = {"lam": spec.lam, "preserve_scale": spec.preserve_scale if spec.method == "uce" else 0.0,
             "edit": spec.edit, "layer": spec.layer, "erase_rows": len(sets.erase), "preserve_rows": len(sets.preserve)}
    log.info("%s: %d projections, %d erase rows, %d preserve rows", spec.method, len(factors) + len(dense),
             len(sets.erase), len(sets.preserve))
    return Delta.from_factors(pipe, factors, dense, method=spec.method if spec.edit == "cross_attention"
                              else f"{spec.method}-text-encoder", base_model=pipe.name, hyperparameters=hyper,
                              spec=spec_to_dict(spec))


def normal_equation_residual(weight_new: torch.Tensor, weight_old: torch.Tensor, sets: EditSets, lam: float,
                             preserve_scale: float) -> float:
    """Relative residual of the defining (normal) equations ``W' M = lam W + W C*^T C + s W P^T P``."""
    Wn, W = weight_new.double(), weight_old.double()
    C, G, P = sets.erase, sets.guide, sets.preserve
    M = lam * torch.eye(W.shape[1], dtype=torch.float64) + C.T @ C + preserve_scale * P.T @ P
    rhs = lam * W + W @ G.T @ C + preserve_scale * W @ P.T @ P
    return float((Wn @ M - rhs).norm() / rhs.norm())
