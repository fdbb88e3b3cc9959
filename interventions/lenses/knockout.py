"""Attention knockout (Geva et al. 2023; Basu et al. 2024 on image tokens), compiled to pyvene.

To cut the edges from positions S to a target position t in layer l, the attention scores of t's
query for S's keys are set to minus infinity before the softmax, in every head: t then attends
only to the other positions, renormalised. Done over a window of layers centred on each layer
(`conventions.window`), the grid says at which layers the information flows from S to t.

**The scores as a site.** transformers computes attention in one function call, so the scores
are not any module's output, and pyvene's own ``attention_weight`` site is a silent no-op on
models that use SDPA. Inside `scores_site` each attention module gets a child module
``lesion_scores`` (an identity), and the model runs on the attention function registered in
`interventions.models.attention` (transformers' `AttentionInterface`, its documented extension point;
the previous implementation is restored on exit). That function computes eager attention and
passes the scores through ``lesion_scores`` as ``(batch, query, heads x keys)``, so a pyvene node
on ``...self_attn.lesion_scores.output`` sees the target query's scores as one unit at its
position, and an `AddIntervention` adds the row's mask (0, or -inf at the cut keys).

One row per (prompt, blocked set, layer window, target position), plus one plain row per prompt;
rows of all prompts are right-padded into batches of at most ``max_batch_rows``.

>>> result = run_knockout(spec, model, tokenizer)                          # doctest: +SKIP
>>> result.grids["subject"].values[0, :, 0]   # p(answer), subject -> last cut, per layer   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib

import torch

from interventions.core.conventions import window
from interventions.core.errors import SpecError
from interventions.core.prompts import columns as position_columns
from interventions.core.prompts import model_inputs, pad_token_id
from interventions.engine.plan import resolve_layers
from interventions.engine.pv import AddIntervention, build_graph
from interventions.engine.result import Grid, Result
from interventions.lenses.lens import Reading, readings
from interventions.models.attention import SCORES, ScoresSite, lesion_attention
from interventions.models.sites import site_table

#: Families attention knockout is tested on (a subset of `models.attention.ATTENTION_FAMILIES`); others are refused.
KNOCKOUT_FAMILIES = ("llama", "gemma3", "llava")


@contextlib.contextmanager
def scores_site(model):
    """Within: every attention module has a ``lesion_scores`` child and runs Lesion's eager attention
    (`interventions.models.attention`); on exit the children are removed and the implementation restored."""
    with lesion_attention(model, "attention knockout", KNOCKOUT_FAMILIES) as modules:
        try:
            for m in modules:
                m.add_module(SCORES, ScoresSite())
            yield [f"{site_table(model).sites['attention_output'][0].format(layer)}.{SCORES}.output"
                   for layer in range(len(modules))]
        finally:
            for m in modules:
                m._modules.pop(SCORES, None)


def blocked_positions(r: Reading, source: str, target: int) -> tuple[int, ...]:
    """The positions whose edges into `target` a `block:` entry cuts (only positions <= target exist
    for a causal model)."""
    named = set().union(*r.groups.values()) if r.groups else set()
    if source == "self":
        return (target,)
    if source == "all":
        return tuple(range(target))
    if source == "others":
        return tuple(p for p in range(target) if p not in named)
    return tuple(p for p in r.groups.get(source, ()) if p <= target)


def knockout_targets(spec, prompts: list[Reading]) -> list[list[tuple[str, int]]]:
    """Per prompt, the (label, position) of each target column, every `block` entry checked to cut at
    least one edge into each target."""
    targets = []
    for i, r in enumerate(prompts):
        cols = position_columns(spec.targets, r.enc, "targets")
        targets.append([(label, pos[-1]) for label, pos in cols])
        for source in spec.block:
            for label, t in targets[-1]:
                if not blocked_positions(r, source, t):
                    raise SpecError("block", source, f"positions with an edge into the target {label!r} of "
                                    f"prompts[{i}] ({r.enc.text!r}): it has none")
                if source in ("self", "all") and t == 0:
                    raise SpecError("targets", label, "a target after the first token (the first attends only to itself)")
    return targets


@torch.no_grad()
def run_knockout(spec, model, tokenizer, *, processor=None, max_batch_rows: int | None = None) -> Result:
    """`kind: knockout`: one grid per `block` entry, p(target) with those edges cut, [prompt][layer][target]."""
    from interventions.core.runtime import eval_mode, input_device

    table = site_table(model)
    n = table.num_layers(model)
    layers = list(resolve_layers(spec, n))
    prompts = readings(spec, model, tokenizer, processor)
    targets = knockout_targets(spec, prompts)
    # rows: (prompt, source, layer index, column) or (prompt, None, None, None) for the plain run
    rows = [(i, None, None, None) for i in range(len(prompts))]
    rows += [(i, s, k, c) for i in range(len(prompts)) for s in spec.block for k in range(len(layers))
             for c in range(len(targets[i]))]
    size = max_batch_rows or spec.max_batch_rows
    probs = torch.empty(len(rows))
    with scores_site(model) as components, eval_mode(model):
        graph = build_graph(model, [(c, AddIntervention()) for c in components])
        for lo in range(0, len(rows), size):
            chunk = rows[lo:lo + size]
            logp = _chunk_logprobs(spec, model, tokenizer, graph, prompts, targets, layers, chunk, input_device(model))
            for b, (i, s, k, c) in enumerate(chunk):
                r = prompts[i]
                if s is None and r.target_id is None:
                    r.target_id = int(logp[b].argmax())
                probs[lo + b] = logp[b, r.target_id].exp()
    return _knockout_result(spec, tokenizer, prompts, targets, layers, rows, probs)


def _chunk_logprobs(spec, model, tokenizer, graph, prompts, targets, layers: list[int], chunk: list,
                    device) -> torch.Tensor:
    """Log-probabilities at each row's read position, with the row's edges cut in its window of layers:
    an additive -inf mask on the attention scores, switched on per layer through `subspaces`."""
    n = site_table(model).num_layers(model)
    heads = getattr(model.config, "text_config", model.config).num_attention_heads
    encs = [prompts[i].enc for i, *_ in chunk]
    inputs = model_inputs(encs, pad_token_id(tokenizer), device)
    width = inputs["attention_mask"].shape[1]
    where, masks, on = [], [], [[] for _ in range(n)]
    for i, source, k, c in chunk:
        t = targets[i][c][1] if source is not None else len(prompts[i].enc) - 1
        mask = torch.zeros(width)
        if source is not None:
            mask[list(blocked_positions(prompts[i], source, t))] = float("-inf")
            cut = set(window(layers[k], spec.window, n))
        else:
            cut = set()
        where.append([t])
        masks.append(mask.repeat(heads)[None])
        for layer in range(n):
            on[layer].append([0] if layer in cut else [])
    source_rep = torch.stack(masks)                         # (rows, 1, heads x keys)
    _, out = graph(base={**inputs, "use_cache": False}, unit_locations={"base": [where] * n},
                   source_representations={key: source_rep for key in graph.sorted_keys},
                   subspaces=on)
    last = torch.tensor([len(e) - 1 if s is None else targets[i][c][1]
                         for e, (i, s, _, c) in zip(encs, chunk)])
    return out.logits[torch.arange(len(chunk)), last.to(out.logits.device)].float().log_softmax(-1).cpu()


def _knockout_result(spec, tokenizer, prompts, targets, layers: list[int], rows: list, probs: torch.Tensor) -> Result:
    width = max(len(t) for t in targets)
    grids = {s: torch.full((len(prompts), len(layers), width), float("nan")) for s in spec.block}
    records = []
    for row, (i, s, k, c) in enumerate(rows):
        if s is None:
            r = prompts[i]
            records.append({**r.record, "target": r.target if r.target is not None else tokenizer.decode([r.target_id]),
                            "target_id": r.target_id, "clean_prob": float(probs[row]),
                            "columns": [label for label, _ in targets[i]],
                            "blocked": {src: {label: list(blocked_positions(r, src, t)) for label, t in targets[i]}
                                        for src in spec.block}})
        else:
            grids[s][i, k, c] = probs[row]
    lengths = [len(t) for t in targets]
    out = {s: Grid(s, "attention_scores", "prob", layers, values, lengths) for s, values in grids.items()}
    return Result("knockout", spec.model, spec, records, out,
                  {"layers": layers, "window": spec.window, "rows": len(rows)})
