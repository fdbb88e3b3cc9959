"""Attribution rules: what replaces the plain gradient in attribution patching's first-order term.

`method: attribution` estimates a cell as ``m(base) + Σ (a_source − a_base) · ĝ`` (see
`interventions.engine.attribution`). The `rule` chooses ĝ and what is added to it:

- ``gradient``: ĝ = ∂m/∂a, attribution patching as Nanda (2023) and Syed et al. (2023) define it;
  with `steps: k` averaged along the input path (EAP-IG).
- ``relp``: Relevance Patching (Jafari, Eberle, Khakzar, Nanda 2025). ĝ is the gradient of a modified
  backward pass that carries layer-wise relevance propagation's rules, at the gradient's cost. The
  forward values are unchanged bit for bit; only the backward differs (`relp_rules`):
  - norms (LN rule): the normalising scale 1/σ (RMSNorm: 1/rms) is held constant, so a norm is linear;
  - attention (AH rule): the attention probabilities are held constant, so relevance flows through
    the values only;
  - the MLP's activation (identity rule): relevance passes as through the identity,
    ``ĝ_in = ĝ_out · act(x)/x``;
  - a gated MLP's product ``act(gate) · up`` (uniform rule): each factor takes half the relevance;
  - linear maps: the plain gradient (LRP-0).
  On a model without biases (Llama, Gemma) every layer is then linear in its input given the held
  quantities, so for a linear metric (`logit_diff`) the relevance ``Σ a · ĝ`` is the same at every layer
  and equals the metric: the conservation a test checks.
- ``qk-fix``: AtP*'s fix for attention saturation (Kramár et al. 2024). Where a restored state next
  enters an attention layer, the linear term through that layer's queries and keys,
  ``∇q · Δq + ∇k · Δk``, is replaced by the pattern's exact change, ``Σ ∇A · (A' − A)``: the layer's
  queries and keys at the cell's positions are recomputed from the base residual plus the cell's delta
  (through the model's own norm, projections and rotary embedding), the softmax is taken again, and the
  change of the probabilities is weighed by the gradient at them. Downstream of the pattern the
  estimate stays linear. A state restored at layer l next enters attention at layer l + 1 (`embed` and
  `block_input` at l: layer l). In a window the deltas of the members restored so far add up on the
  residual stream (the direct path), so each member's next attention layer sees their sum; a hidden
  state replaces the residual stream, so it sees its own.
- ``atp-star``: the QK fix and GradDrop (Kramár et al. 2024): the estimate is computed once with the
  gradient through each layer's residual contributions (attention and MLP outputs) dropped, and the
  cell's value is ``m(base) + 1/(L−1) Σ_ℓ |estimate_ℓ|``. Like the paper's, it is a magnitude, not a
  signed effect: it finds cells whose effects cancel along some path. Cost: one backward per layer.

`qk-fix` and `atp-star` need the attention probabilities, so they run on Lesion's registered eager
attention (`interventions.models.attention`); so does `relp`, which holds them constant.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import nn
from transformers.cache_utils import Cache

from interventions.core.errors import SpecError
from interventions.models.attention import WEIGHTS, ScoreArgs, attention_modules, attention_scores, lesion_attention
from interventions.models.sites import get_module


class Rule(NamedTuple):
    """What a rule needs beyond one backward pass."""

    qk_fix: bool        # the attention layers' records, and the QK fix's corrections
    grad_drop: bool     # one backward per layer, that layer's gradient dropped


RULES = {"gradient": Rule(False, False), "relp": Rule(False, False), "qk-fix": Rule(True, False),
         "atp-star": Rule(True, True)}
#: Sites whose state replaces the residual stream (the others add to it), and the layer offset of the
#: attention that next reads them.
REPLACES = {"embed": 0, "block_input": 0, "block_output": 1}
ADDS = {"attention_output": 1, "mlp_output": 1, "mlp_key": 1}
#: Gemma 3 normalises a block's outputs before adding them: site -> the decoder layer's norm.
POST_NORMS = {("gemma3", "attention_output"): "post_attention_layernorm",
              ("gemma3", "mlp_output"): "post_feedforward_layernorm",
              ("gemma3", "mlp_key"): "post_feedforward_layernorm"}
_ACTIVATIONS = ("act_fn", "act", "activation_fn")


def check_rule(rule: str, plan) -> None:
    """Refuse a rule the plan's model or grids cannot take, naming the field."""
    if rule == "gradient":
        return
    attention_modules(plan.model, f"`rule: {rule}`")
    if RULES[rule].qk_fix and any(g.axis != "layer" for g in plan.grids.values()):
        raise SpecError("rule", rule, "'gradient' or 'relp' for a `features:` grid (the QK fix needs a "
                        "state on the residual stream's path)")
    if RULES[rule].qk_fix and any(plan.table.in_context(g.site) for g in plan.grids.values()):
        raise SpecError("rule", rule, "'gradient' or 'relp' for grids over a prompt's context sequence")


def _keep_value(out: torch.Tensor, x: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """`out`'s value with the gradient ``ratio`` (held constant) with respect to `x`."""
    return out.detach() + (x - x.detach()) * ratio.detach()


def _norm_rule(module, args, out):
    x = args[0]
    if isinstance(module, nn.LayerNorm):
        centred = x - x.mean(-1, keepdim=True)
        scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + module.eps).detach()
        linear = centred * scale * (module.weight if module.weight is not None else 1)
        return out.detach() + (linear - linear.detach())
    return _keep_value(out, x, torch.where(x == 0, torch.zeros_like(out), out / x))


def _identity_rule(module, args, out):
    x = args[0]
    return _keep_value(out, x, torch.where(x == 0, torch.full_like(out, 0.5), out / x))


def _hold_weights(module, query, key, weights, args):
    return weights.detach()


def _norms(model, table) -> list[nn.Module]:
    layers = get_module(model, table.layers)
    found = [m for m in layers.modules() if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")]
    return found + [get_module(model, table.final_norm)]


def _mlps(model, table) -> list[nn.Module]:
    return [table.module(model, "mlp_output", layer) for layer in range(table.num_layers(model))]


def _gated_rule(mlp: nn.Module, act: nn.Module) -> list:
    """Hooks splitting ``act(gate) · up`` half and half between its factors (the uniform rule)."""
    seen = {}

    def keep(name):
        def hook(module, args, out):
            seen[name] = out
        return hook

    def split(module, args):
        g, u = seen.pop("gate"), seen.pop("up")
        half = 0.5 * (g * u.detach()) + 0.5 * (g.detach() * u)
        return (args[0].detach() + (half - half.detach()),)

    return [act.register_forward_hook(keep("gate")), mlp.up_proj.register_forward_hook(keep("up")),
            mlp.down_proj.register_forward_pre_hook(split)]


@contextlib.contextmanager
def _reaching(model, use: str, reach):
    """Within: Lesion's eager attention, each layer's attention module ``i`` passing its probabilities
    through ``reach(i)`` (`interventions.models.attention`); yields the modules."""
    with lesion_attention(model, use) as attentions:
        try:
            for i, m in enumerate(attentions):
                m.__dict__[WEIGHTS] = reach(i)
            yield attentions
        finally:
            for m in attentions:
                m.__dict__.pop(WEIGHTS, None)


@contextlib.contextmanager
def relp_rules(model, table):
    """Within: `model`'s backward pass carries RelP's rules (module docstring); forward values unchanged.
    `table`: the model's site table."""
    handles = []
    with _reaching(model, "`rule: relp`", lambda i: _hold_weights):
        try:
            handles += [m.register_forward_hook(_norm_rule) for m in {id(m): m for m in _norms(model, table)}.values()]
            for mlp in _mlps(model, table):
                act = next(getattr(mlp, n) for n in _ACTIVATIONS if hasattr(mlp, n))
                handles.append(act.register_forward_hook(_identity_rule))
                if hasattr(mlp, "up_proj") and hasattr(mlp, "gate_proj"):
                    handles += _gated_rule(mlp, act)
            yield
        finally:
            for h in handles:
                h.remove()


class _Primed(Exception):
    """Raised from inside a replayed layer once its query and key states are known."""

    def __init__(self, query, key):
        super().__init__()
        self.query, self.key = query, key


@dataclass
class _Layer:
    """One attention layer's base run: its query and key states, probabilities and how it was called."""

    query: torch.Tensor
    key: torch.Tensor
    weights: torch.Tensor
    args: ScoreArgs
    call: tuple = ()
    grads: dict = field(default_factory=dict)    # drop (None: no drop) -> (∇q, ∇k, ∇A)


class QKFix:
    """The records of one base run that the QK fix needs, and the corrections it gives (module docstring)."""

    def __init__(self, model, table):
        self.model, self.table = model, table
        self.n = self.table.num_layers(self.model)
        self.layers: dict[int, _Layer] = {}
        self._calls: dict[int, tuple] = {}

    @contextlib.contextmanager
    def recording(self):
        """Within: each attention layer's states and probabilities are kept with their gradients."""
        layers = get_module(self.model, self.table.layers)
        with _reaching(self.model, "`rule: qk-fix`", self._keeper):
            handles = [layer.register_forward_pre_hook(self._caller(i), with_kwargs=True)
                       for i, layer in enumerate(layers)]
            try:
                yield
            finally:
                for h in handles:
                    h.remove()

    def _keeper(self, i):
        def keep(module, query, key, weights, args):
            for t in (query, key, weights):
                t.retain_grad()
            self.layers[i] = _Layer(query, key, weights, args, self._calls.pop(i))
            return weights
        return keep

    def _caller(self, i):
        def call(module, args, kwargs):
            self._calls[i] = (args, kwargs)
        return call

    def keep_grads(self, drop: int | None) -> None:
        """Store the gradients the last backward left at every layer (as `drop`'s), and clear them. Dropping
        layer ℓ changes no gradient at a later layer, so those keep only the undropped ones."""
        for i, rec in self.layers.items():
            if drop is None or i <= drop:
                rec.grads[drop] = tuple(t.grad.detach().clone() for t in (rec.query, rec.key, rec.weights))
            for t in (rec.query, rec.key, rec.weights):
                t.grad = None

    def _residual(self, site: str, layer: int | None, state: torch.Tensor) -> torch.Tensor:
        """What `state` at `site` adds to (or puts on) the residual stream."""
        if site == "mlp_key":
            state = self.table.module(self.model, site, layer)(state)
        norm = POST_NORMS.get((self.table.family, site))
        if norm is not None:
            state = getattr(get_module(self.model, self.table.layers)[layer], norm)(state)
        return state

    def deltas(self, site: str, members: tuple, source: dict, states: dict) -> list[tuple[int, torch.Tensor]]:
        """(attention layer, residual delta ``(rows, T, d)``) where each restored member's state next enters
        attention."""
        out, total = [], 0
        for m in members:
            node = (site, m)
            if site in REPLACES:
                layer = (m or 0) + REPLACES[site]
                delta = source[node].expand_as(states[node]) - states[node]
            else:
                layer = m + ADDS[site]
                base = self._residual(site, m, states[node])
                delta = total = total + self._residual(site, m, source[node]).expand_as(base) - base
            if layer < self.n:
                out.append((layer, delta))
        return out

    @torch.no_grad()
    def primed(self, layer: int, deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K, rows, heads, T, d_head)`` query and key states of layer `layer` with each of `deltas`
        ``(K, rows, T, d)`` added to its input at every position (a position's query and key depend on
        its own input only), from one replay of the layer that stops inside its attention."""
        rec = self.layers[layer]
        args, kwargs = rec.call
        h = (args[0] if args else kwargs["hidden_states"]).detach()
        rows, many = h.shape[0], len(deltas)
        moved = (h[None] + deltas.to(h.dtype)).flatten(0, 1)
        args = (moved, *(_repeat_rows(a, rows, many) for a in args[1:])) if args else ()
        kwargs = {k: _repeat_rows(v, rows, many) for k, v in kwargs.items()}
        if not args:
            kwargs["hidden_states"] = moved
        attention = self.table.module(self.model, "attention_output", layer)
        attention.__dict__[WEIGHTS] = _stop
        try:
            get_module(self.model, self.table.layers)[layer](*args, **kwargs)
        except _Primed as primed:
            return primed.query.unflatten(0, (many, rows)), primed.key.unflatten(0, (many, rows))
        finally:
            attention.__dict__.pop(WEIGHTS, None)
        raise RuntimeError(f"layer {layer} did not reach its attention")

    @torch.no_grad()
    def corrections(self, layer: int, deltas: torch.Tensor, columns: list[tuple], drops) -> torch.Tensor:
        """``(K, drops, columns)``: for each of `deltas` ``(K, rows, T, d)`` at `layer`'s input and each
        column's positions, ``Σ ∇A · (A' − A) − ∇q · Δq − ∇k · Δk``, averaged over the rows, under each drop's
        gradients. Call within `lesion_attention`."""
        rec = self.layers[layer]
        query, key_states = self.primed(layer, deltas)                 # (K, rows, heads, T, d_head)
        at = torch.zeros(len(columns), query.shape[-2], dtype=torch.bool, device=query.device)
        for c, positions in enumerate(columns):
            at[c, list(positions)] = True
        where = at[None, :, None, None, :, None]                       # (K, columns, rows, heads, T, d_head)
        q = torch.where(where, query[:, None], rec.query.detach())
        k = torch.where(where, key_states[:, None], rec.key.detach())
        many, rows = q.shape[0] * q.shape[1], q.shape[2]
        mask = _repeat_rows(rec.args.attention_mask, rows, many)
        scores = attention_scores(q.flatten(0, 2), k.flatten(0, 2), replace(rec.args, attention_mask=mask))
        wide = torch.promote_types(query.dtype, torch.float32)
        change = scores.softmax(-1, dtype=wide).unflatten(0, q.shape[:3]) - rec.weights.detach().to(wide)
        dq, dk = ((moved[:, None] - base.detach()).to(wide) * where for moved, base in
                  ((query, rec.query), (key_states, rec.key)))
        out = []
        for drop in drops:
            gq, gk, ga = (g.to(wide) for g in rec.grads.get(drop, rec.grads[None]))
            value = torch.einsum("ncrhqk,rhqk->nc", change, ga) - torch.einsum("ncrhtd,rhtd->nc", dq, gq) \
                - torch.einsum("ncrhtd,rhtd->nc", dk, gk)
            out.append(value / rows)
        return torch.stack(out, 1).double().cpu()


def _repeat_rows(value, rows: int, times: int):
    """`value` (a tensor, or a tuple of them, as a layer is called with) with a batch of `rows` repeated
    `times` times; a key/value cache dropped (a replay must not extend it); anything else as it is."""
    if isinstance(value, Cache):
        return None
    if isinstance(value, tuple):
        return tuple(_repeat_rows(v, rows, times) for v in value)
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows and rows > 1:
        return value.repeat(times, *(1,) * (value.dim() - 1))
    return value


def _stop(module, query, key, weights, args):
    raise _Primed(query.detach(), key.detach())


@contextlib.contextmanager
def grad_drop(model, table):
    """Within: yields a one-element list; while it holds layer ℓ, the gradient through layer ℓ's attention
    and MLP outputs is zero (GradDrop). Hooks are on the outputs' tensors of the run made within."""
    dropped, handles = [None], []

    def hook(layer):
        def on_output(module, args, out):
            t = out[0] if isinstance(out, tuple) else out
            if t.requires_grad:
                t.register_hook(lambda g: torch.zeros_like(g) if dropped[0] == layer else g)
        return on_output

    for layer in range(table.num_layers(model)):
        for site in ("attention_output", "mlp_output"):
            handles.append(table.module(model, site, layer).register_forward_hook(hook(layer)))
    try:
        yield dropped
    finally:
        for h in handles:
            h.remove()
