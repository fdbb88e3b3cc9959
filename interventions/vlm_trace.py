"""Causal tracing in a LLaVA-architecture VLM, over image-token and text positions, compiled to pyvene.

Corrupt the image, then restore one clean state of the language model at a time:

- ``noise``: seeded Gaussian noise (``noise`` × σ, σ = the std of the clean image tokens) added to
  the image tokens where the LM receives them (the projector's output), `samples` draws per cell;
- ``swap``: a counterfactual image instead of the clean one (one draw).

Sites: ``hidden`` (decoder layer output), ``mlp`` and ``attention`` (windows of `window` layers),
as in the language-model trace; the cells are (layer, position) over every position of the prompt,
image tokens included. One pyvene graph per site holds the corruption node and one restore node
per layer; each batch row restores one cell (per-row ``subspaces``), as in the LM engine.

>>> result = vlm_trace(vlm, tokenizer, [VLMCase(pixels, " The capital of this country is", "Paris")])  # doctest: +SKIP
>>> result.grids["hidden"].values.shape        # prompt, layer, position                                # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import SpecError
from .pv import AddIntervention, CollectStates, RestoreIntervention, build_graph
from .result import Grid
from .sites import LLAVA
from .spec import TRACE_SITES
from .vlm import image_positions, image_prompt

PROJECTOR = "model.multi_modal_projector.output"


@dataclass
class VLMCase:
    """One image and question: `pixels` ``(3, H, W)``, the text after the image, and the answer word."""

    pixels: torch.Tensor
    text: str
    target: str
    counterfactual: torch.Tensor | None = None     # for `corruption: swap`
    label: str = ""


def _windows(n_layers: int, window: int, site: str) -> list[list[int]]:
    w = 1 if site == "hidden" else window
    out = []
    for layer in range(n_layers):
        lo = max(0, min(layer - w // 2, n_layers - w))
        out.append(list(range(lo, lo + w)))
    return out


def target_id(tokenizer, target: str, field: str) -> int:
    ids = tokenizer(" " + target.strip(), add_special_tokens=False).input_ids
    if not ids:
        raise SpecError(field, target, "a word the tokenizer turns into at least one token")
    return ids[0]


@torch.no_grad()
def vlm_trace(vlm, tokenizer, cases: list[VLMCase], *, sites=("hidden", "mlp", "attention"), corruption="noise",
              noise: float = 3.0, samples: int = 10, seed: int = 0, window: int = 10, max_batch_rows: int = 48,
              sigma: float | None = None):
    """``(grids, records)``: per site a `Grid` of p(target) with one clean state restored per cell."""
    for s in sites:
        if s not in TRACE_SITES:
            raise SpecError("sites", s, "one of " + ", ".join(repr(k) for k in TRACE_SITES))
    if corruption not in ("noise", "swap"):
        raise SpecError("corruption", corruption, "'noise' or 'swap'")
    n_layers = LLAVA.num_layers(vlm)
    n_img = vlm.config.image_seq_length
    dev = next(vlm.parameters()).device
    draws = samples if corruption == "noise" else 1
    records, values = [], {s: [] for s in sites}
    for i, case in enumerate(cases):
        if corruption == "swap" and case.counterfactual is None:
            raise SpecError(f"prompts[{i}].counterfactual_image", None, "an image for `corruption: swap`")
        ids = image_prompt(tokenizer, vlm, case.text)
        L = len(ids)
        tid = target_id(tokenizer, case.target, f"prompts[{i}].target")
        base = {"input_ids": torch.tensor([ids], device=dev), "pixel_values": case.pixels[None].to(dev)}
        # clean run: every layer's state of every site at every position, and the image tokens' scale
        paths = {(s, l): LLAVA.component(TRACE_SITES[s], l) for s in sites for l in range(n_layers)}
        nodes = list(paths.values()) + [PROJECTOR]
        collect = build_graph(vlm, [(p, CollectStates()) for p in nodes])
        locs = [[list(range(L))] for _ in paths] + [[list(range(n_img))]]
        (_, states), out = collect(base=base, unit_locations={"base": locs})
        clean = {key: st[0] for key, st in zip(paths, states)}                # (L, d)
        image_tokens = states[-1][0]                                            # (n_img, d)
        clean_p = float(out.logits[0, -1].softmax(-1)[tid])
        scale = sigma if sigma is not None else float(image_tokens.std())
        g = torch.Generator().manual_seed(seed + 7919 * i)
        eps = torch.randn(draws, n_img, image_tokens.shape[-1], generator=g) * noise * scale
        corrupt_pixels = case.pixels if corruption == "noise" else case.counterfactual
        corrupt_p = _corrupted_prob(vlm, ids, corrupt_pixels, eps if corruption == "noise" else None, tid, dev)
        for s in sites:
            wins = _windows(n_layers, window, s)
            cells = [(wins[l], pos) for l in range(n_layers) for pos in range(L)]
            rows = [(c, k) for c in cells for k in range(draws)]
            graph = build_graph(vlm, ([(PROJECTOR, AddIntervention())] if corruption == "noise" else [])
                                + [(LLAVA.component(TRACE_SITES[s], l), RestoreIntervention()) for l in range(n_layers)])
            probs = []
            for lo in range(0, len(rows), max_batch_rows):
                chunk = rows[lo:lo + max_batch_rows]
                probs.append(_run_rows(vlm, graph, ids, corrupt_pixels, eps, chunk, clean, s, n_layers, n_img,
                                       corruption == "noise", tid, dev))
            p = torch.cat(probs).view(len(cells), draws).mean(1)
            values[s].append(p.view(n_layers, L))
        tokens = tokenizer.convert_ids_to_tokens(ids)
        records.append({"prompt": case.text, "label": case.label, "answer": case.target, "target": case.target,
                        "tokens": tokens, "columns": tokens, "image_positions": image_positions(ids, vlm),
                        "subject_positions": image_positions(ids, vlm), "clean_prob": clean_p,
                        "corrupted_prob": corrupt_p, "sigma": scale})
    grids = {}
    for s in sites:
        width = max(v.shape[1] for v in values[s])
        stacked = torch.stack([torch.nn.functional.pad(v, (0, width - v.shape[1]), value=float("nan"))
                               for v in values[s]])
        grids[s] = Grid(s, TRACE_SITES[s], "prob", list(range(n_layers)), stacked.cpu(), [v.shape[1] for v in values[s]])
    return grids, records


def _corrupted_prob(vlm, ids, pixels, eps, tid, dev) -> float:
    inputs = {"input_ids": torch.tensor([ids], device=dev), "pixel_values": pixels[None].to(dev)}
    if eps is None:
        return float(vlm(**inputs).logits[0, -1].softmax(-1)[tid])
    graph = build_graph(vlm, [(PROJECTOR, AddIntervention())])
    n = len(eps)
    inputs = {k: v.expand(n, *v.shape[1:]) for k, v in inputs.items()}
    _, out = graph(base=inputs, unit_locations={"base": [[list(range(eps.shape[1]))] * n]},
                   source_representations={graph.sorted_keys[0]: eps.to(dev)}, subspaces=[[[0]] * n])
    return float(out.logits[:, -1].softmax(-1)[:, tid].mean())


def _run_rows(vlm, graph, ids, pixels, eps, rows, clean, site, n_layers, n_img, noised, tid, dev) -> torch.Tensor:
    n = len(rows)
    base = {"input_ids": torch.tensor([ids] * n, device=dev), "pixel_values": pixels[None].expand(n, -1, -1, -1).to(dev)}
    locs, subspaces, reps = [], [], {}
    keys = list(graph.sorted_keys)
    if noised:
        locs.append([list(range(n_img))] * n)
        subspaces.append([[0]] * n)
        reps[keys.pop(0)] = torch.stack([eps[k] for _, k in rows]).to(dev)
    for layer, key in zip(range(n_layers), keys):
        locs.append([[pos] for (_, pos), _ in rows])
        subspaces.append([[0] if layer in win else [] for (win, _), _ in rows])
        reps[key] = torch.stack([clean[(site, layer)][pos][None] for (_, pos), _ in rows]).to(dev)
    _, out = graph(base=base, unit_locations={"base": locs}, source_representations=reps, subspaces=subspaces)
    return out.logits[:, -1].softmax(-1)[:, tid].float().cpu()
