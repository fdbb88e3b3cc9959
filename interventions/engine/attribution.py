"""Attribution patching: the first-order approximation of a whole trace or patch grid.

Exact patching runs one forward per cell. Attribution patching (Nanda 2023; Syed et al. 2023,
"AtP") replaces the patched metric by its Taylor expansion around the base run:

    m(patch a_source into cell c) ≈ m(base) + Σ_{(layer, pos) ∈ c} (a_source − a_base) · ∂m/∂a_base

so every cell of every grid comes from one source forward and one base forward + backward
per prompt (per noise sample, for noise traces; the samples go through as one batch).

With `steps: k > 1` the gradient is path-integrated, as in EAP-IG (Hanna et al. 2024): it is
averaged over k runs whose input embeddings lie on the straight line from the base (corrupted)
run's to the source (clean) run's, at α = 0, 1/k, …, (k−1)/k (a left Riemann sum, so k = 1 is
plain attribution patching), and multiplied by the same state difference a_source − a_base:

    m(patch c) ≈ m(base) + Σ_{(layer, pos) ∈ c} (a_source − a_base) · (1/k) Σ_j ∂m/∂a |_{x(α_j)}

For the embeddings themselves this is integrated gradients, whose terms over all positions add up
to m(source) − m(base) as k grows (tested). Cost: k forwards and backwards per prompt.
A window of layers, or a column of several positions, is the sum of its members' terms. A feature
(a `features:` grid) moves its site's state along its decoder row, so its term is
``(a_source[u] − a_base[u]) · (∂m/∂x · W_dec[u])``.
The grids have the exact engine's layout and meaning (patched metric, so a trace's indirect
effect is value − corrupted probability), and `meta.method` says "attribution".

Gradients are read with plain autograd hooks on the site table's modules, not through pyvene:
pyvene's collected states are copies off the autograd path. The parameters' `requires_grad`
flags are switched off for the pass (only activations get gradients) and restored after.
Every run is fed its input embeddings (``inputs_embeds``: the embedding lookup, or a VLM prompt's
embeddings with its image features merged in), so the noise and the path act on them directly and
the `embed` site's state and gradient are theirs; language models and VLMs take the same path.

`metric: kl` has no first-order term (the KL is at its minimum at the base run), so it is
refused.
"""

from __future__ import annotations

import contextlib

import torch

from interventions.core.runtime import eval_mode, input_device, keeps_logits
from interventions.engine.assemble import assemble_result
from interventions.engine.plan import EMBED, Plan, compile_spec, is_trace, language_prompts
from interventions.engine.pv import unit_target
from interventions.engine.result import Result


@contextlib.contextmanager
def _no_param_grads(model):
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _sites_needed(plan: Plan) -> list[tuple[str, int | None]]:
    """(site, layer) pairs whose states and gradients the grids need."""
    need = set()
    for axes in plan.grids.values():
        if not plan.table.is_layered(axes.site):
            need.add((axes.site, None))
            continue
        n = plan.table.num_layers(plan.model, axes.site)
        need |= {(axes.site, layer) for layer in range(n)}
    return sorted(need, key=lambda x: (x[0], -1 if x[1] is None else x[1]))


@contextlib.contextmanager
def _capture(plan: Plan, nodes, store: dict, *, grads: bool):
    """Keep each layer node's state (``[batch, T, d]``) in `store`; with `grads`, retain their gradients.
    The `embed` node is the input embeddings themselves, which the caller stores."""
    handles = []

    def keep(node, t):
        if grads:
            t.retain_grad()
        store[node] = t

    for node in nodes:
        site, layer = node
        if site == EMBED:
            continue
        module = plan.table.module(plan.model, site, layer)
        if plan.table.component(site, layer).endswith(".input"):
            handles.append(module.register_forward_pre_hook(lambda m, args, node=node: keep(node, args[0])))
        else:
            handles.append(module.register_forward_hook(
                lambda m, args, out, node=node: keep(node, out[0] if isinstance(out, tuple) else out)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _embeddings(plan: Plan, enc, device) -> torch.Tensor:
    """``(1, T, d)`` input embeddings of one prompt: its own (a VLM's, image features merged in) or the
    embedding lookup of its ids (GPT-2's positions and Gemma's scaling stay where the model adds them)."""
    if enc.embeds is not None:
        return enc.embeds[None].to(device)
    embed = plan.table.module(plan.model, EMBED)
    return embed(torch.tensor([enc.ids], device=device))


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 models stay float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _metric_tensor(metric: str, logits: torch.Tensor, target: int, counterfactual: int | None) -> torch.Tensor:
    logits = _wide(logits)
    if metric == "prob":
        return logits.softmax(-1)[..., target]
    if metric == "logit_diff":
        return logits[..., target] - logits[..., counterfactual]
    raise ValueError(f"`metric`: {metric!r} has no first-order attribution; use 'prob' or 'logit_diff'")


def run_attribution(spec, model, tokenizer, *, prepare=language_prompts, processor=None, units: tuple = ()) -> Result:
    """Every grid of `spec` by attribution patching (see the module docstring); `prepare` and `units` as in
    `compile_spec`."""
    plan = compile_spec(spec, model, tokenizer, prepare=prepare, processor=processor, units=units)
    nodes = _sites_needed(plan)
    device = input_device(model)
    trace = is_trace(spec)
    acc = {name: torch.zeros(len(plan.prompts), len(g.layers), plan.width(name), dtype=torch.float64)
           for name, g in plan.grids.items()}
    baseline = torch.zeros(len(plan.prompts), dtype=torch.float64)
    clean_probs, base_top1 = torch.zeros(len(plan.prompts), dtype=torch.float64), {}
    cells = _cells_by_prompt(plan)
    steps, metric = spec.steps, "prob" if trace else spec.metric
    with eval_mode(model), _no_param_grads(model):
        for i, prompt in enumerate(plan.prompts):
            source = {}
            with torch.no_grad(), _capture(plan, nodes, source, grads=False):
                source_embeds = _embeddings(plan, prompt.source, device)
                source[(EMBED, None)] = source_embeds
                logits = _final_logits(model, source_embeds, prompt.source.context)[0]
            if prompt.target_id is None:
                prompt.target_id = int(logits.argmax())
            clean_probs[i] = float(_wide(logits).softmax(-1)[prompt.target_id])
            rows = plan.variants
            with torch.no_grad():
                base_embeds = _embeddings(plan, prompt.base, device).expand(rows, -1, -1).clone()
                if plan.noise is not None:
                    base_embeds[:, list(prompt.base.subject)] += plan.noise[i].to(device, base_embeds.dtype)
            grads, states = {}, {}
            for j in range(steps):
                alpha, run = j / steps, {}
                # the base run's embeddings, moved α towards the source's
                embeds = base_embeds if alpha == 0 else (1 - alpha) * base_embeds + alpha * source_embeds
                embeds = embeds.detach().requires_grad_()
                run[(EMBED, None)] = embeds
                with torch.enable_grad(), _capture(plan, nodes, run, grads=True):
                    logits = _final_logits(model, embeds, prompt.base.context)
                    if j == 0:
                        if not trace and prompt.counterfactual_id is None:
                            prompt.counterfactual_id = int(logits[0].argmax())
                        base_top1[i] = int(logits[0].argmax())
                    values = _metric_tensor(metric, logits, prompt.target_id, prompt.counterfactual_id)
                    values.sum().backward()
                if j == 0:
                    baseline[i] = float(values.detach().double().mean())
                    states = {node: _wide(run[node].detach()) for node in nodes}
                for node in nodes:
                    grads[node] = grads.get(node, 0) + _wide(run[node].grad) / steps
            _fill(acc, i, cells[i], float(baseline[i]), nodes, units, source, states, grads)
    result = assemble_result(plan, acc, baseline, clean_probs, base_top1)
    result.meta.update(method="attribution", steps=steps, rows=len(plan.prompts) * (steps * plan.variants + 1),
                       forward_passes=len(plan.prompts) * (steps + 1), backward_passes=len(plan.prompts) * steps)
    result.meta.pop("cells_equal_to_baseline", None)
    return result


def _fill(acc: dict, i: int, cells: list, baseline: float, nodes, units, source: dict, states: dict,
          grads: dict) -> None:
    """Prompt `i`'s cells: the baseline plus the first-order terms of the states (and features) each restores."""
    # per (site, layer): Σ_d (a_source − a_base)·grad, averaged over the rows: [T]
    terms = {node: ((_wide(source[node]) - states[node]) * grads[node]).sum(-1).mean(0).double().cpu()
             for node in nodes}
    features = {u.name: _feature_terms(u, source, states, grads) for u in units}
    for cell in cells:
        if cell.grid in features:
            value = float(features[cell.grid][list(cell.positions), cell.layer_index].sum())
        else:
            value = sum(float(terms[(cell.site, l)][list(cell.positions)].sum()) for l in (cell.layers or (None,)))
        acc[cell.grid][i, cell.layer_index, cell.column] = baseline + value


def _feature_terms(axis, source: dict, states: dict, grads: dict) -> torch.Tensor:
    """``Float[Tensor, "T rows"]``: each grid row's first-order term at each position, averaged over the
    batch rows, ``(a_source[u] − a_base[u]) · (grad · W_dec[u])`` summed over the row's features: a feature
    moves the state along its decoder row, the dictionary's error held fixed."""
    node, basis, rows = (axis.site, axis.layer), axis.basis, axis.rows()
    units = sorted({u for row in rows for u in row})
    weight = basis.W_dec[units]
    a_source, a_base = (basis.encode(x.to(weight.dtype))[..., units] for x in (source[node], states[node]))
    target = unit_target(axis.edit, axis.value, a_base, a_source.expand_as(a_base))
    terms = ((target - a_base) * (grads[node].to(weight.dtype) @ weight.T)).mean(0).double().cpu()
    member = torch.zeros(len(units), len(rows), dtype=terms.dtype)      # feature -> the rows holding it
    column = {u: i for i, u in enumerate(units)}
    for r, row in enumerate(rows):
        member[[column[u] for u in row], r] = 1.0
    return terms @ member


def _final_logits(model, embeds: torch.Tensor, context: tuple[int, ...] = ()) -> torch.Tensor:
    """``Float[Tensor, "rows vocab"]`` at the last position of `embeds` ``(rows, T, d)`` (no padding),
    computing the LM head there only when the model allows it; `context`: the text read with them, if any."""
    inputs = {"inputs_embeds": embeds, "attention_mask": torch.ones(embeds.shape[:2], dtype=torch.long,
                                                                     device=embeds.device)}
    if context:
        ids = torch.tensor([context], device=embeds.device).expand(len(embeds), -1)
        inputs.update(context_ids=ids, context_mask=torch.ones_like(ids))
    if keeps_logits(model):
        inputs["logits_to_keep"] = 1
    return model(**inputs, use_cache=False).logits[:, -1]


def _cells_by_prompt(plan: Plan) -> list[list]:
    """Every grid cell once (windows and positions as `compile_spec` built them), by prompt."""
    out = [[] for _ in plan.prompts]
    for cell in [r.cell for c in plan.chunks for r in c.rows if r.cell is not None and r.variant == 0] \
            + plan.noop_cells:
        out[cell.prompt].append(cell)
    return out
