"""Concept erasure and remapping in text-to-image models: UCE, TIME, Diff-QuickFix, a RECE-style
closed-form iteration, and an ESD-x fine-tuning baseline.

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

**RECE-style iteration** (`method: rece`, after Gong et al. 2024): an erasure leaves embeddings
that still regenerate the concept. With the edited projections ``W'_l`` (every ``to_k``/``to_v``)
the embedding whose edited keys and values best match the concept's original ones is, in closed form,

    c_adv = argmin_c  sum_l |W'_l c - W_l c_e|^2 + lam |c|^2 = (sum_l W'_l^T W'_l + lam I)^-1 sum_l W'_l^T W_l c_e

for every erase row ``c_e``; those rows join the erase set (towards the same guide rows) and the
update is solved again from the base weights, `rece_rounds` times. No gradient step anywhere.

**ESD-x** (`method: esd-x`, Gandikota et al. 2023, cross-attention variant): fine-tune every
``attn2`` projection so that the noise prediction for the concept prompt follows the negatively
guided target ``eps(x_t, "") - eta (eps(x_t, c) - eps(x_t, ""))`` of the unedited model; the
states ``x_t`` are the unedited model's own sampling trajectories for the template prompts. It is
the fine-tuning baseline the closed forms are compared with; its seconds are the edit's seconds.

>>> spec = parse_spec({"kind": "erase", "concepts": [{"concept": "red", "guide": "blue"}],
...                    "preserve": ["green", "yellow"], "templates": ["a {} circle"]})      # doctest: +SKIP
>>> delta, report = erase(spec, load_pipeline(spec.model))                               # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from editors.delta import Delta
from interventions.core.errors import SpecError
from interventions.engine.pv import CollectStates, build_graph
from interventions.modalities.text_to_image.pipeline import DiffusionPipe, DiffusionSites
from interventions.modalities.text_to_image.trace import subject_positions
from interventions.spec import parse_spec, spec_to_dict

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


def preserve_weight(spec) -> float:
    return spec.preserve_scale if spec.method in ("uce", "rece") else 0.0


def solve(spec, pipe: DiffusionPipe, sets: EditSets) -> dict[str, tuple]:
    """Factors ``(u, v)`` of every edited projection's change, from the base weights."""
    params = dict(pipe.named_parameters())
    return {name: closed_form(params[name], sets, spec.lam, preserve_weight(spec)) for name in projections(spec, pipe)}


def edited_weights(pipe: DiffusionPipe, changes: dict[str, tuple]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (W, W')}`` in float64 for every changed projection."""
    params = dict(pipe.named_parameters())
    return {n: (params[n].detach().double().cpu(), params[n].detach().double().cpu() + u @ v)
            for n, (u, v) in changes.items()}


def regenerating_embeddings(weights: dict[str, tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor,
                            lam: float) -> torch.Tensor:
    """RECE's closed form: per row ``c_e`` of `rows`, the embedding ``c`` whose edited projections best
    reproduce the base projections of ``c_e``: ``(sum W'^T W' + lam I)^-1 sum W'^T W c_e``."""
    d = rows.shape[1]
    A = lam * torch.eye(d, dtype=torch.float64)
    B = torch.zeros(d, d, dtype=torch.float64)
    for W, Wn in weights.values():
        A += Wn.T @ Wn
        B += Wn.T @ W
    return torch.linalg.solve(A, B @ rows.T).T


def rece_sets(spec, pipe: DiffusionPipe, sets: EditSets) -> tuple[EditSets, dict[str, tuple], list[dict]]:
    """UCE, then `spec.rece_rounds` rounds of adding the regenerating embeddings of the concept rows to
    the erase set (towards the same guide rows) and solving again from the base weights."""
    concept, guide = sets.erase, sets.guide
    changes, rounds = solve(spec, pipe, sets), []
    for r in range(spec.rece_rounds):
        weights = edited_weights(pipe, changes)
        found = regenerating_embeddings(weights, concept, spec.lam)
        # how much of the concept's base keys/values the found embeddings still bring back, before this round
        back = sum(float((Wn @ found.T - W @ concept.T).norm() ** 2) for W, Wn in weights.values())
        base = sum(float((W @ concept.T).norm() ** 2) for W, _ in weights.values())
        rounds.append({"round": r + 1, "residual": (back / base) ** 0.5,
                       "norm_ratio": float(found.norm(dim=1).mean() / concept.norm(dim=1).mean())})
        sets = EditSets(torch.cat([sets.erase, found]), torch.cat([sets.guide, guide]), sets.preserve)
        changes = solve(spec, pipe, sets)
    return sets, changes, rounds


def locate_layer(spec, pipe: DiffusionPipe) -> tuple[int, dict]:
    """Diff-QuickFix's localization (`layer: auto`): trace the text encoder's self-attention outputs on the
    first template, the concept swapped for the guide (or the first preserved word); the layer whose
    restored output, at the concept's tokens or any later one, brings the concept back most."""
    from interventions.modalities.text_to_image.trace import trace

    c = spec.concepts[0]
    other = c.guide or (spec.preserve[0] if spec.preserve else "")
    if not other:
        raise SpecError("layer", "auto", "a first concept with a `guide`, or a `preserve` word: the trace swaps "
                        "it in for the concept")
    prompt = fill(spec.templates[0], c.concept)
    tspec = parse_spec({"kind": "trace", "modality": "text-to-image", "model": spec.model, "prompts": [
        {"prompt": prompt, "subject": c.concept, "counterfactual_subject": other, "target": c.concept}],
        "sites": ["text_attention"], "positions": "prompt", "images": spec.images, "seed": spec.seed,
        **({"steps": spec.steps} if spec.steps else {})})
    grid = trace(tspec, pipe).grids["text_attention"]
    values = grid.values[0]                                  # layers x positions
    start = subject_positions(pipe, prompt, c.concept, "concepts[0].concept")[0]
    effect = values[:, start:].max(dim=1).values
    layer = grid.layers[int(effect.argmax())]
    return layer, {"prompt": prompt, "counterfactual": other, "layer": layer,
                   "effect_by_layer": [round(float(v), 4) for v in effect]}


def erase(spec, pipe: DiffusionPipe) -> Delta:
    """The edit of `spec` as a Delta against `pipe` (which is left unchanged)."""
    if spec.method == "esd-x":
        return esd_x(spec, pipe)
    extra = {}
    if spec.layer == "auto":
        layer, extra["located"] = locate_layer(spec, pipe)
        spec = spec.model_copy(update={"layer": layer})
    sets = edit_sets(spec, pipe)
    if spec.method == "rece":
        sets, changes, extra["rece"] = rece_sets(spec, pipe, sets)
    else:
        changes = solve(spec, pipe, sets)
    factors, dense = {}, {}
    for name, (u, v) in changes.items():
        f, d = compress(u, v)
        if f is not None:
            factors[name] = f
        else:
            dense[name] = d
    hyper = {"lam": spec.lam, "preserve_scale": preserve_weight(spec), "edit": spec.edit, "layer": spec.layer,
             "erase_rows": len(sets.erase), "preserve_rows": len(sets.preserve), **extra}
    if spec.method == "rece":
        hyper["rece_rounds"] = spec.rece_rounds
    log.info("%s: %d projections, %d erase rows, %d preserve rows", spec.method, len(factors) + len(dense),
             len(sets.erase), len(sets.preserve))
    return Delta.from_factors(pipe, factors, dense, method=spec.method if spec.edit == "cross_attention"
                              else f"{spec.method}-text-encoder", base_model=pipe.name, hyperparameters=hyper,
                              spec=spec_to_dict(spec))


# ------------------------------------------------------------------------- ESD-x
def esd_parameters(pipe: DiffusionPipe) -> list[str]:
    """ESD-x's trainable set: every cross-attention projection's weight (query, key, value, output)."""
    return [f"unet.{name}.{proj}.weight" for name in DiffusionSites(pipe).cross_attention
            for proj in ("to_q", "to_k", "to_v", "to_out.0")]


@torch.no_grad()
def esd_pool(spec, pipe: DiffusionPipe, seeds_per_prompt: int = 4):
    """The unedited model's DDIM trajectories for every concept x template prompt: per visited state,
    ``(x_t, t, context, target)`` with ESD's target ``eps_u - eta (eps_c - eps_u)``."""
    prompts = [fill(t, c.concept) for c in spec.concepts for t in spec.templates]
    rows = [p for p in prompts for _ in range(seeds_per_prompt)]
    seeds = [spec.seed + 500_000 + k for k in range(len(rows))]
    context = pipe.encode(rows)
    xs, ts, targets, ctx = [], [], [], []

    def record(step, sl, x2, t, context2):
        eps = pipe.unet(x2, t, encoder_hidden_states=context2).sample
        eps_u, eps_c = eps.chunk(2)
        n = len(eps_u)
        xs.append(x2[:n])
        ts.append(torch.full((n,), int(t)))
        targets.append(eps_u - spec.esd_eta * (eps_c - eps_u))
        ctx.append(context2[n:])
        return eps

    pipe.sample(context, seeds, unet_hook=record)
    return torch.cat(xs), torch.cat(ts), torch.cat(ctx), torch.cat(targets)


def esd_x(spec, pipe: DiffusionPipe) -> Delta:
    """ESD-x on a copy of the UNet; the Delta is the trained minus the base cross-attention weights."""
    import copy

    x, t, ctx, target = esd_pool(spec, pipe)
    names = esd_parameters(pipe)
    student = copy.deepcopy(pipe.unet).train()
    student.requires_grad_(False)
    trained = {n: student.get_parameter(n[len("unet."):]) for n in names}
    for p in trained.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(list(trained.values()), lr=spec.esd_lr)
    g = torch.Generator().manual_seed(spec.seed)
    losses = []
    for _ in range(spec.esd_steps):
        rows = torch.randint(len(x), (min(16, len(x)),), generator=g)
        with torch.enable_grad():
            pred = student(x[rows], t[rows].to(x.device), encoder_hidden_states=ctx[rows]).sample
            loss = torch.nn.functional.mse_loss(pred, target[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    params = dict(pipe.named_parameters())
    dense = {n: (p.detach() - params[n].detach()).float().cpu() for n, p in trained.items()}
    hyper = {"esd_steps": spec.esd_steps, "esd_lr": spec.esd_lr, "esd_eta": spec.esd_eta, "pool": len(x),
             "loss_first": losses[0], "loss_last_mean_10": sum(losses[-10:]) / len(losses[-10:])}
    log.info("esd-x: %d steps, loss %.4f -> %.4f", spec.esd_steps, losses[0], hyper["loss_last_mean_10"])
    return Delta.from_factors(pipe, {}, dense, method="esd-x", base_model=pipe.name, hyperparameters=hyper,
                              spec=spec_to_dict(spec))


def normal_equation_residual(weight_new: torch.Tensor, weight_old: torch.Tensor, sets: EditSets, lam: float,
                             preserve_scale: float) -> float:
    """Relative residual of the defining (normal) equations ``W' M = lam W + W C*^T C + s W P^T P``."""
    Wn, W = weight_new.double(), weight_old.double()
    C, G, P = sets.erase, sets.guide, sets.preserve
    M = lam * torch.eye(W.shape[1], dtype=torch.float64) + C.T @ C + preserve_scale * P.T @ P
    rhs = lam * W + W @ G.T @ C + preserve_scale * W @ P.T @ P
    return float((Wn @ M - rhs).norm() / rhs.norm())


# ------------------------------------------------------------------------- methods side by side
#: Every erasure method by name; `diff-quickfix` is UCE on one text-encoder layer.
METHODS = ("uce", "time", "rece", "esd-x", "diff-quickfix")


def with_method(spec, method: str, layer: int | None = None):
    """`spec` with another method (same concepts, templates, lam and judging): `diff-quickfix` edits
    text-encoder layer `layer` (or the spec's); TIME and ESD-x drop the preserve term they lack."""
    if method not in METHODS:
        raise SpecError("method", method, "one of " + ", ".join(METHODS))
    data = spec_to_dict(spec)
    data.update(method="uce" if method == "diff-quickfix" else method, edit="cross_attention", layer=None)
    if method == "diff-quickfix":
        data.update(edit="text_encoder", layer=spec.layer if layer is None else layer)
    if method in ("time", "esd-x"):
        data["preserve"] = []
    return parse_spec(data)
