"""Run a compiled plan as batched counterfactual forward passes, prompt block by block.

1. One clean pass per block of source prompts collects every needed state (pyvene
   `CollectStates`), computed once and reused by every row as
   ``source_representations``.
2. Baseline rows (the corrupted or base run, no restore) give corrupted / base
   probabilities and, for patching, the base's top-1 token; they keep their
   key/value cache and every layer's output.
3. Cell rows run chunk by chunk through the site's graph, from their shared
   prefix (cached positions) and their first changed layer (cached layers); only
   the logits at each row's answer position are computed, and scored per chunk.

>>> result = run(spec, model, tokenizer)          # doctest: +SKIP
>>> result.grids["hidden"].values.shape           # (prompts, layers, positions)  # doctest: +SKIP
torch.Size([1, 30, 10])
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from interventions.core.distributed import all_sum, world
from interventions.core.metrics import score
from interventions.core.prompts import model_inputs, pad_token_id
from interventions.core.runtime import eval_mode, input_device, keeps_logits
from interventions.engine.assemble import assemble_result
from interventions.engine.attribution import run_attribution
from interventions.engine.plan import Chunk, Plan, compile_spec, is_trace, language_prompts, restoring
from interventions.engine.result import Result

log = logging.getLogger(__name__)


def run(spec, model, tokenizer, *, prepare=language_prompts, processor=None, max_batch_rows: int | None = None,
        progress: bool | None = None, share_prefix: bool = True, skip_layers: bool = True,
        memory: int | None = None, units: tuple = ()) -> Result:
    """Compile and run a trace or patch `spec` on a model the caller already has (`method: attribution`
    included). `prepare`: the prompt preparer for the spec's modality (see `compile_spec`);
    `processor`: a VLM's image processor; `units`: feature grids (`plan.UnitAxis`)."""
    if getattr(spec, "method", "exact") == "attribution":
        return run_attribution(spec, model, tokenizer, prepare=prepare, processor=processor, units=units)
    plan = compile_spec(spec, model, tokenizer, prepare=prepare, processor=processor, max_batch_rows=max_batch_rows,
                        share_prefix=share_prefix, skip_layers=skip_layers, memory=memory, units=units)
    return run_plan(plan, progress=progress)


@torch.inference_mode()
def run_plan(plan: Plan, *, progress: bool | None = None) -> Result:
    """Run prompt block by prompt block: the block's clean pass, then its chunks. A block's
    clean states and baseline caches are dropped before the next block starts."""
    with eval_mode(plan.model):
        acc = {name: torch.zeros(len(plan.prompts), len(g.layers), plan.width(name), dtype=torch.float64)
               for name, g in plan.grids.items()}
        baseline = torch.zeros(len(plan.prompts), dtype=torch.float64)
        clean_probs = torch.zeros(len(plan.prompts), dtype=torch.float64)
        base_top1: dict[int, int] = {}
        bar = tqdm(total=plan.num_rows, desc=f"{plan.spec.kind} rows", unit="row", disable=_quiet(progress, plan),
                   mininterval=1.0)
        rank, processes = world()
        cell_chunks = 0
        for b, block in enumerate(plan.blocks):
            cache, source_logprobs = clean_pass(plan, block)
            _resolve_targets(plan, block, source_logprobs)
            for i, prompt in zip(block, source_logprobs):
                clean_probs[i] = float(prompt[plan.prompts[i].target_id].exp())
            chunks = [c for c in plan.chunks if c.block == b]
            kv: dict = {}            # (prompt, variant) -> baseline key/value states and layer outputs, while needed
            last_use = {r.prompt: i for i, c in enumerate(chunks) for r in c.rows}
            for i, chunk in enumerate(chunks):
                mine = chunk.baseline or cell_chunks % processes == rank
                cell_chunks += not chunk.baseline
                logits = run_chunk(plan, chunk, cache, kv) if mine else None
                for key in [k for k in kv if last_use[k[0]] == i]:
                    del kv[key]
                if logits is None:
                    continue
                if chunk.baseline:
                    for row, top1 in zip(chunk.rows, logits.argmax(-1).tolist()):
                        base_top1[row.prompt] = top1
                        prompt = plan.prompts[row.prompt]
                        if prompt.counterfactual_id is None and not is_trace(plan.spec):
                            prompt.counterfactual_id = top1
                prompts = [plan.prompts[r.prompt] for r in chunk.rows]
                reference = (source_logprobs[torch.tensor([r.prompt - block[0] for r in chunk.rows])]
                             if _metric(plan) == "kl" else None)
                values = score(_metric(plan), logits, [p.target_id for p in prompts],
                               [p.counterfactual_id for p in prompts], reference) / plan.variants
                for row, value in zip(chunk.rows, values.tolist()):
                    if row.cell is None:
                        baseline[row.prompt] += value
                    else:
                        acc[row.cell.grid][row.prompt, row.cell.layer_index, row.cell.column] += value
                bar.update(len(chunk.rows))
            del cache, source_logprobs, kv
        bar.close()
        all_sum(acc.values())            # torchrun: every cell was computed by exactly one process
        for cell in plan.noop_cells:
            acc[cell.grid][cell.prompt, cell.layer_index, cell.column] = baseline[cell.prompt]
    return assemble_result(plan, acc, baseline, clean_probs, base_top1)


def _quiet(progress: bool | None, plan: Plan) -> bool:
    return not progress if progress is not None else plan.num_rows < 200


def _metric(plan: Plan) -> str:
    return "prob" if is_trace(plan.spec) else plan.spec.metric


def _last_logits(model, inputs: dict, last: list[int], call):
    """(rows, vocab) logits at each row's position in `last`, computing as few positions as the model
    allows, and the model's output."""
    if keeps_logits(model):
        keep = sorted(set(last))
        inputs = {**inputs, "logits_to_keep": torch.tensor(keep, device=inputs["attention_mask"].device)}
        out = call(inputs)
        if len(keep) == 1:                 # every row ends at one position: a view, not a (rows, vocab) copy
            return out.logits[:, 0].float(), out
        index = [keep.index(p) for p in last]
    else:
        out, index = call(inputs), last
    return out.logits[torch.arange(len(last)), torch.tensor(index)].float(), out


def clean_pass(plan: Plan, block: list[int]) -> tuple[dict, torch.Tensor]:
    """Collect the clean states of every graph node and the source's last-position log-probs
    for the prompts of `block` (consecutive indices).

    Returns ``cache[(site, layer)]``: ``Float[Tensor, "prompt pos d"]`` (padded), and
    ``Float[Tensor, "prompt vocab"]`` log-probs, both indexed from ``block[0]``.
    """
    device = input_device(plan.model)
    seqs = [plan.prompts[i].source for i in block]
    in_context = [plan.table.in_context(site) for site, _ in plan.collect_nodes]
    widths = {False: max(len(s) for s in seqs), True: max(len(s.context) for s in seqs)}
    parts: dict = {node: [] for node in plan.collect_nodes}
    logprobs = []
    size = plan.clean_rows
    for start in range(0, len(seqs), size):
        batch = seqs[start:start + size]
        inputs = model_inputs(batch, pad_token_id(plan.tokenizer), device)
        spans = {False: inputs["attention_mask"].shape[1], True: inputs.get("context_mask", inputs["attention_mask"]).shape[1]}
        locations = {"base": [[list(range(spans[c]))] * len(batch) for c in in_context]}
        last = [len(s) - 1 for s in batch]

        def call(kwargs, locations=locations):
            (_, collected), out = plan.collect_graph(base=kwargs, unit_locations=locations)
            for node, context, states in zip(plan.collect_nodes, in_context, collected):
                parts[node].append(torch.nn.functional.pad(states, (0, 0, 0, widths[context] - states.shape[1])))
            return out

        inputs["use_cache"] = False
        logprobs.append(_last_logits(plan.model, inputs, last, call)[0].log_softmax(-1))
    cache = {node: torch.cat(chunks) for node, chunks in parts.items()}
    return cache, torch.cat(logprobs)


def _resolve_targets(plan: Plan, block: list[int], source_logprobs: torch.Tensor) -> None:
    for i, logprobs in zip(block, source_logprobs):
        if plan.prompts[i].target_id is None:
            plan.prompts[i].target_id = int(logprobs.argmax())


def source_representations(plan: Plan, chunk: Chunk, cache: dict, locations: dict) -> dict:
    """The per-node source tensors of `chunk`: cached clean states, or scaled noise."""
    graph = plan.graphs[chunk.graph]
    prompts = torch.tensor([r.prompt for r in chunk.rows]) - plan.blocks[chunk.block][0]
    reps = {}
    for key, node, locs in zip(graph.sorted_keys, plan.nodes[chunk.graph], locations["base"]):
        if node[0] == "noise":
            reps[key] = _noise_rows(plan, chunk, len(locs[0]))
        else:
            positions = torch.tensor(locs) + chunk.prefix
            states = cache[node]
            reps[key] = states[prompts[:, None].to(states.device), positions.to(states.device)]
    return reps     # the interventions move each to its node's device


def _noise_rows(plan: Plan, chunk: Chunk, k: int) -> torch.Tensor:
    """``(rows, k, d)``: each row's noise at the subject positions the chunk computes, padded like its
    locations by repeating the first (a row whose subject lies wholly in the cached prefix: zeros)."""
    rows: dict[int, tuple[list[int], list[int]]] = {}          # prompt -> (rows in the chunk, their draws)
    for b, r in enumerate(chunk.rows):
        rows.setdefault(r.prompt, ([], []))[0].append(b)
        rows[r.prompt][1].append(r.variant)
    first = plan.noise[chunk.rows[0].prompt]
    out = first.new_zeros(len(chunk.rows), k, first.shape[-1])
    for prompt, (at, draws) in rows.items():
        noise = plan.noise[prompt]
        j = len(plan.noised(chunk, chunk.rows[at[0]]))               # subject positions ascend
        if j:
            chosen = noise[torch.tensor(draws), noise.shape[1] - j:]
            out[torch.tensor(at)] = torch.cat([chosen, chosen[:, :1].expand(-1, k - j, -1)], 1)
    return out


def run_chunk(plan: Plan, chunk: Chunk, cache: dict, kv: dict) -> torch.Tensor:
    """Run one chunk through its graph: ``Float[Tensor, "rows vocab"]`` answer-position logits.

    Baseline chunks store their key/value states and layer outputs in `kv`; chunks with
    a prefix read the key/value states, and chunks with a later start the layer outputs.
    """
    graph = plan.graphs[chunk.graph]
    p = chunk.prefix
    inputs = model_inputs([plan.prompts[r.prompt].base for r in chunk.rows], pad_token_id(plan.tokenizer),
                          input_device(plan.model), start=p)
    width = inputs["attention_mask"].shape[1]       # the positions this chunk computes
    keep_kv = chunk.baseline and plan.shares_prefix
    if p:
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"].new_ones(len(chunk.rows), p),
                                              inputs["attention_mask"]], dim=1)
        inputs["past_key_values"] = _stack_kv([kv[(r.prompt, r.variant)]["kv"] for r in chunk.rows], p)
    elif keep_kv:
        inputs["past_key_values"] = DynamicCache()   # full layers: sliding ones must keep every position
    inputs["use_cache"] = bool(p or keep_kv)
    table = restoring(chunk)                    # one table of restoring rows for both
    locations = plan.unit_locations(chunk, table)
    reps = source_representations(plan, chunk, cache, locations)
    subspaces = plan.subspaces(chunk, table)
    last = [len(plan.prompts[r.prompt].base) - 1 - p for r in chunk.rows]

    def call(kwargs):
        _, out = graph(base=kwargs, unit_locations=locations, source_representations=reps, subspaces=subspaces)
        return out

    if chunk.baseline and plan.skips_layers:
        with _record_layers(plan.layer_modules) as outputs:
            logits, out = _last_logits(plan.model, inputs, last, call)
        for b, r in enumerate(chunk.rows):
            kv.setdefault((r.prompt, r.variant), {})["layers"] = (outputs, b)
    else:
        stored = [kv[(r.prompt, r.variant)]["layers"] for r in chunk.rows] if chunk.start else []
        with _skip_layers(plan.layer_modules[:chunk.start], stored, p, width):
            logits, out = _last_logits(plan.model, inputs, last, call)
    if keep_kv:
        layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        for b, r in enumerate(chunk.rows):
            kv.setdefault((r.prompt, r.variant), {})["kv"] = (layers, b)
    return logits


@contextmanager
def _record_layers(modules: list[torch.nn.Module]):
    """Collect each module's output, ``Float[Tensor, "rows pos d"]``, during the block."""
    outputs: list[torch.Tensor] = [None] * len(modules)

    def hook(i):
        def record(module, args, out):
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"skip_layers needs decoder layers that return a tensor; "
                                f"{type(module).__name__} returned {type(out).__name__} "
                                "(run with skip_layers=False)")
            outputs[i] = out
        return record

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


class _Grouped:
    """Rows of a chunk grouped by the baseline chunk that stored their states, grouped once: each group's
    rows in one index tensor, and the order that puts the concatenated groups back in row order.

    `entries`: per row, ``(the baseline chunk's stored object, the row's index there)``."""

    def __init__(self, entries: list[tuple[object, int]]):
        groups: dict[int, tuple[object, list[int], list[int]]] = {}
        for position, (source, b) in enumerate(entries):
            group = groups.setdefault(id(source), (source, [], []))
            group[1].append(position)
            group[2].append(b)
        self.groups = [(source, torch.tensor(rows)) for source, _, rows in groups.values()]
        order = [p for _, positions, _ in groups.values() for p in positions]
        self.order = None if len(self.groups) == 1 else torch.argsort(torch.tensor(order))

    def gather(self, take) -> torch.Tensor:
        """Stack, in row order, ``take(source, rows)`` over the groups: one indexing op per group, not per row."""
        parts = [take(source, rows) for source, rows in self.groups]
        if self.order is None:
            return parts[0]
        width = max(t.shape[-2] for t in parts)
        out = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[-2])) for t in parts])
        return out[self.order.to(out.device)]


def _index(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return tensor[rows.to(tensor.device)]


@contextmanager
def _skip_layers(modules: list[torch.nn.Module], stored: list[tuple[object, int]], prefix: int, width: int):
    """Replace each module's computation with the baseline output it had at positions
    ``prefix : prefix + width`` (rows right-padded). Hooks on the modules still run.

    `stored`: per row, ``(the baseline chunk's per-layer outputs, the row's index there)``; each
    layer's output stays on its own device (accelerate may spread the layers)."""
    saved = []
    n = len(modules)

    def fit(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        t = _index(t[..., prefix:prefix + width, :], rows)      # slice first: copy only what is used
        return torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[-2]))

    grouped = _Grouped(stored) if n else None
    outs = [grouped.gather(lambda s, rows, i=i: fit(s[i], rows)) for i in range(n)]
    for i, module in enumerate(modules):
        out = outs[i]

        def forward(*args, out=out, **kwargs):
            return out

        saved.append(module.__dict__.get("forward"))     # accelerate keeps its own wrapper here
        module.forward = forward
    try:
        yield
    finally:
        for module, old in zip(modules, saved):
            if old is None:
                del module.forward
            else:
                module.forward = old


def _stack_kv(states: list[tuple[list, int]], prefix: int) -> DynamicCache:
    """A batch cache of the first `prefix` positions of each row's baseline key/value states.

    `states`: per row, ``(the baseline chunk's per-layer (keys, values), the row's index there)``."""
    cache, grouped = DynamicCache(), _Grouped(states)
    for layer in range(len(states[0][0])):
        keys = grouped.gather(lambda s, rows: _index(s[layer][0][:, :, :prefix], rows))
        values = grouped.gather(lambda s, rows: _index(s[layer][1][:, :, :prefix], rows))
        cache.update(keys, values, layer)
    return cache
