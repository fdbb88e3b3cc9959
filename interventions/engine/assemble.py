"""The `Result` of a grid run, from its accumulated cells: shared by the exact engine and attribution."""

from __future__ import annotations

import torch

from interventions.core.distributed import world
from interventions.engine.plan import Plan, is_trace
from interventions.engine.result import Grid, Result


def assemble_result(plan: Plan, acc: dict, baseline: torch.Tensor, clean_probs: torch.Tensor,
                    base_top1: dict) -> Result:
    """The `Result` of a run (exact or attribution): one record per prompt, the grids (NaN past a
    prompt's columns), and what ran in `meta`."""
    records = []
    trace = is_trace(plan.spec)
    for i, p in enumerate(plan.prompts):
        shown = p.source if trace else p.base       # a trace shows its clean prompt, a patch its base
        record = {
            "prompt": shown.text,
            "tokens": list(shown.tokens),
            "subject_positions": list(shown.subject),
            "columns": [label for label, _ in p.columns],
            "column_positions": [list(positions) for _, positions in p.columns],
            "answer": plan.tokenizer.decode([p.target_id]),
            "answer_id": p.target_id,
            "clean_prob": float(clean_probs[i]),
        }
        if trace:
            record["corrupted_prob"] = float(baseline[i])
            if plan.spec.corruption == "swap" and p.base.text != p.source.text:
                record["corrupted_prompt"] = p.base.text
        else:
            record.update(source=p.source.text, base_metric=float(baseline[i]),
                          counterfactual_target=plan.tokenizer.decode([p.counterfactual_id]),
                          counterfactual_id=p.counterfactual_id,
                          base_top1=plan.tokenizer.decode([base_top1[i]]))
        if p.context_columns:
            record.update(context=plan.tokenizer.decode(list(shown.context)) if shown.context else "",
                          context_columns=[label for label, _ in p.context_columns],
                          context_column_positions=[list(positions) for _, positions in p.context_columns])
        record.update(p.record)
        records.append(record)
    grids = {}
    for name, axes in plan.grids.items():
        values = acc[name].float()
        lengths = [len(plan.columns(name, i)) for i in range(len(plan.prompts))]
        for i, n in enumerate(lengths):
            values[i, :, n:] = float("nan")
        grids[name] = Grid(name=name, site=axes.site, metric=axes.metric, layers=list(axes.layers),
                           values=values, lengths=lengths, axis=axes.axis, layer=axes.layer, context=axes.context)
    config = plan.model.config
    meta = {"sigma": plan.sigma, "rows": plan.num_rows, "variants": plan.variants, "processes": world()[1],
            "chunks": len(plan.chunks), "prompt_blocks": len(plan.blocks), "memory_budget": plan.memory,
            "cells_equal_to_baseline": len(plan.noop_cells),
            # what actually ran: `run()` accepts any model object, whatever the spec's `model` says
            "model_type": config.model_type, "model_name_or_path": getattr(config, "name_or_path", ""),
            "num_layers": plan.table.num_layers(plan.model), "family": plan.table.family}
    return Result(kind=plan.spec.kind, model=plan.spec.model, spec=plan.spec, prompts=records, grids=grids,
                  meta=meta)
