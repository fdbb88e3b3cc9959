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
from dataclasses import dataclass, field

import torch

from interventions.core.runtime import eval_mode, input_device, keeps_logits
from interventions.engine.assemble import assemble_result
from interventions.engine.plan import EMBED, Plan, compile_spec, is_trace, language_prompts
from interventions.engine.pv import unit_target
from interventions.engine.result import Result
from interventions.engine.rules import RULES, QKFix, check_rule, grad_drop, relp_rules
from interventions.models.attention import lesion_attention


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
    """Every grid of `spec` by attribution patching (see the module docstring) under its `rule`
    (`interventions.engine.rules`); `prepare` and `units` as in `compile_spec`."""
    plan = compile_spec(spec, model, tokenizer, prepare=prepare, processor=processor, units=units)
    rule = spec.rule
    check_rule(rule, plan)
    nodes = _sites_needed(plan)
    device = input_device(model)
    acc = {name: torch.zeros(len(plan.prompts), len(g.layers), plan.width(name), dtype=torch.float64)
           for name, g in plan.grids.items()}
    baseline = torch.zeros(len(plan.prompts), dtype=torch.float64)
    clean_probs, base_top1 = torch.zeros(len(plan.prompts), dtype=torch.float64), {}
    cells = _cells_by_prompt(plan)
    metric = "prob" if is_trace(spec) else spec.metric
    estimate = _qk_estimate if RULES[rule].qk_fix else _gradient_estimate
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
            with torch.no_grad():
                base_embeds = _embeddings(plan, prompt.base, device).expand(plan.variants, -1, -1).clone()
                if plan.noise is not None:
                    base_embeds[:, list(prompt.base.subject)] += plan.noise[i].to(device, base_embeds.dtype)
            base = _Base(plan, prompt, nodes, metric, source, source_embeds, base_embeds, units)
            values = estimate(base, cells[i], spec)
            baseline[i], base_top1[i] = base.value, base.top1
            for cell, value in zip(cells[i], values):
                acc[cell.grid][i, cell.layer_index, cell.column] = base.value + value
    result = assemble_result(plan, acc, baseline, clean_probs, base_top1)
    passes = _passes(plan, rule, spec.steps)
    result.meta.update(method="attribution", rule=rule, steps=spec.steps,
                       rows=len(plan.prompts) * (passes[0] * plan.variants + 1),
                       forward_passes=len(plan.prompts) * (passes[0] + 1),
                       backward_passes=len(plan.prompts) * passes[1])
    result.meta.pop("cells_equal_to_baseline", None)
    return result


def _passes(plan: Plan, rule: str, steps: int) -> tuple[int, int]:
    """(base forwards, backwards) per prompt: `steps` each; AtP* one forward and one backward per layer
    dropped plus the undropped one."""
    if RULES[rule].grad_drop:
        return 1, plan.table.num_layers(plan.model) + 1
    return steps, steps


#: QK-fix deltas held before their corrections are computed together
_PENDING = 64


@dataclass
class _Base:
    """One prompt's base (corrupted) run as the estimators need it: the source states beside it, and what
    the run found (its metric value, top-1 token, states)."""

    plan: Plan
    prompt: object
    nodes: list
    metric: str
    source: dict
    source_embeds: torch.Tensor
    embeds: torch.Tensor
    units: tuple = ()
    value: float = 0.0
    top1: int = 0
    states: dict = field(default_factory=dict)

    def forward(self, embeds: torch.Tensor, run: dict) -> torch.Tensor:
        """The metric of each row run on `embeds` (states captured into `run` with gradients); the first run
        also sets the counterfactual (patch without one), top-1 token and baseline value."""
        prompt = self.prompt
        with _capture(self.plan, self.nodes, run, grads=True):
            logits = _final_logits(self.plan.model, embeds, prompt.base.context)
        first = not self.states
        if first:
            if not is_trace(self.plan.spec) and prompt.counterfactual_id is None:
                prompt.counterfactual_id = int(logits[0].argmax())
            self.top1 = int(logits[0].argmax())
        values = _metric_tensor(self.metric, logits, prompt.target_id, prompt.counterfactual_id)
        if first:
            self.value = float(values.detach().double().mean())
            self.states = {node: _wide(run[node].detach()) for node in self.nodes}
        return values

    def grads(self, run: dict) -> dict:
        """The gradients the last backward left on the captured states, which are then cleared."""
        out = {node: _wide(run[node].grad) for node in self.nodes}
        for node in self.nodes:
            run[node].grad = None
        return out


def _gradient_estimate(base: _Base, cells: list, spec) -> list[float]:
    """`rule: gradient` or `relp`: the gradients (RelP's modified ones) averaged over `steps` points on the
    input path, times the state differences."""
    steps, grads, relp = spec.steps, {}, spec.rule == "relp"
    for j in range(steps):
        alpha, run = j / steps, {}
        # the base run's embeddings, moved α towards the source's
        embeds = base.embeds if alpha == 0 else (1 - alpha) * base.embeds + alpha * base.source_embeds
        run[(EMBED, None)] = embeds = embeds.detach().requires_grad_()
        with torch.enable_grad(), relp_rules(base.plan.model, base.plan.table) if relp else contextlib.nullcontext():
            base.forward(embeds, run).sum().backward()
        for node, g in base.grads(run).items():
            grads[node] = grads.get(node, 0) + g / steps
    return _first_order(base, cells, grads)


def _qk_estimate(base: _Base, cells: list, spec) -> list[float]:
    """`rule: qk-fix` or `atp-star`: the first-order terms with each restored state's next attention
    pattern taken exactly; for `atp-star` once per layer whose gradient is dropped, as magnitudes."""
    plan = base.plan
    qk = QKFix(plan.model, plan.table)
    n = plan.table.num_layers(plan.model)
    drops = [None, *range(n)] if RULES[spec.rule].grad_drop else [None]
    run = {(EMBED, None): base.embeds.detach().requires_grad_()}
    values = {}
    with torch.enable_grad(), qk.recording(), grad_drop(plan.model, plan.table) as dropped:
        total = base.forward(run[(EMBED, None)], run).sum()
        for drop in drops:
            dropped[0] = drop
            total.backward(retain_graph=drop != drops[-1])
            values[drop] = _first_order(base, cells, base.grads(run))
            qk.keep_grads(drop)
    groups: dict[tuple, list[int]] = {}          # cells restoring the same states at other positions
    for c, cell in enumerate(cells):
        groups.setdefault((cell.site, cell.layers or (None,)), []).append(c)
    pending: dict[tuple, list] = {}                # (layer, columns) -> [(cells, delta)]

    def flush():
        for (layer, columns), items in pending.items():
            fixes = qk.corrections(layer, torch.stack([d for _, d in items]), list(columns), drops)
            for (members, _), fix in zip(items, fixes):
                for d, drop in enumerate(drops):
                    for j, c in enumerate(members):
                        values[drop][c] += float(fix[d, j])
        pending.clear()

    with lesion_attention(plan.model, f"`rule: {spec.rule}`"):
        for (site, layers), members in groups.items():
            columns = tuple(cells[c].positions for c in members)
            for layer, delta in qk.deltas(site, layers, base.source, base.states):
                pending.setdefault((layer, columns), []).append((members, delta))
            if sum(len(v) for v in pending.values()) >= _PENDING:
                flush()
        flush()
    if len(drops) == 1:
        return values[None]
    return [sum(abs(values[d][c]) for d in drops[1:]) / (n - 1) for c in range(len(cells))]


def _first_order(base: _Base, cells: list, grads: dict) -> list[float]:
    """Each cell's first-order term: the states (and features) it restores, ``(a_source − a_base) · ĝ``."""
    source, states = base.source, base.states
    # per (site, layer): Σ_d (a_source − a_base)·grad, averaged over the rows: [T]
    terms = {node: ((_wide(source[node]) - states[node]) * grads[node]).sum(-1).mean(0).double().cpu()
             for node in base.nodes}
    features = {u.name: _feature_terms(u, source, states, grads) for u in base.units}
    out = []
    for cell in cells:
        if cell.grid in features:
            out.append(float(features[cell.grid][list(cell.positions), cell.layer_index].sum()))
        else:
            out.append(sum(float(terms[(cell.site, l)][list(cell.positions)].sum()) for l in (cell.layers or (None,))))
    return out


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
