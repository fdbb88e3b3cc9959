"""Causal tracing in a LLaVA-architecture VLM, over image-token and text positions, compiled to pyvene.

Corrupt the input, then restore one clean state of the language model at a time:

- ``noise``: seeded Gaussian noise (``noise`` × σ, σ = the std of the clean image tokens) added to
  the image tokens where the LM receives them (the projector's output), `samples` draws per cell;
- ``swap``: a counterfactual image instead of the clean one (one draw);
- ``text``: seeded noise (σ = the std of those tokens' embeddings) on the embeddings of the text
  constraint, the words of the question named by the case's `constraint` (Basu et al. 2024).

Sites: ``hidden`` (decoder layer output), ``mlp`` and ``attention`` (windows of `window` layers),
as in the language-model trace, with its conventions (`interventions.conventions`): ROME's clipped
window, noise keyed by the case (its text, constraint and pixels) and not by its index, and the
target tokenized as written (" Paris"). The cells are (layer, position) over every position of the prompt,
image tokens included (``image_cells: each``), and (layer, all image tokens at once) — the
aggregated image cell, the one that stays affordable with LLaVA-1.5's 576 image tokens
(``image_cells: block`` traces only it and the text positions). One pyvene graph per site holds the
corruption node and one restore node per layer; each batch row restores one cell (per-row
``subspaces``), as in the LM engine.

>>> grids, records = vlm_trace(vlm, tokenizer, [VLMCase(pixels, " The capital of this country is", " Paris")])  # doctest: +SKIP
>>> grids["hidden"].values.shape        # prompt, layer, position                                # doctest: +SKIP
>>> records[0]["image_block"]["hidden"]  # per layer: p(target) with every image token restored  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from . import conventions
from .conventions import answer_id
from .errors import SpecError
from .pv import AddIntervention, CollectStates, RestoreIntervention, build_graph
from .result import Grid
from .sites import LLAVA
from .spec import TRACE_SITES
from .vlm import image_positions, image_prompt

PROJECTOR = LLAVA.component("projector_output")
EMBED = LLAVA.component("embed")
CORRUPTIONS = ("noise", "swap", "text")
IMAGE_CELLS = ("each", "block", "both")


@dataclass
class VLMCase:
    """One image and question: `pixels` ``(3, H, W)``, the text after the image, and the answer word.

    `counterfactual` is the other image for ``corruption="swap"``; `constraint` the words of `text`
    whose embeddings ``corruption="text"`` corrupts."""

    pixels: torch.Tensor
    text: str
    target: str
    counterfactual: torch.Tensor | None = None
    label: str = ""
    constraint: str | None = None


@dataclass
class _Corruption:
    """Where the corruption goes: a component, the unit positions there, and the draws to add
    (``None`` for a swapped image)."""

    path: str | None
    units: list[int]
    eps: torch.Tensor | None


def constraint_positions(tokenizer, vlm, text: str, constraint: str, field: str) -> list[int]:
    """Positions, in `image_prompt`'s ids, of the tokens of `text` that overlap the words `constraint`."""
    if not constraint or constraint not in text:
        raise SpecError(field, constraint, f"words of the prompt {text!r}")
    start = text.index(constraint)
    end = start + len(constraint)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offset = len(image_prompt(tokenizer, vlm, ""))
    return [offset + i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]


@torch.no_grad()
def vlm_trace(vlm, tokenizer, cases: list[VLMCase], *, sites=("hidden", "mlp", "attention"), corruption="noise",
              noise: float = 3.0, samples: int = 10, seed: int = 0, window: int = 10, max_batch_rows: int = 48,
              sigma: float | None = None, image_cells: str = "both"):
    """``(grids, records)``: per site a `Grid` of p(target) with one clean state restored per cell.

    Each record holds the prompt's tokens, clean and corrupted p(target), σ, and (unless
    ``image_cells="each"``) ``image_block[site]``: per layer, p(target) with the states of every
    image token restored at once."""
    for s in sites:
        if s not in TRACE_SITES:
            raise SpecError("sites", s, "one of " + ", ".join(repr(k) for k in TRACE_SITES))
    if corruption not in CORRUPTIONS:
        raise SpecError("corruption", corruption, "one of " + ", ".join(map(repr, CORRUPTIONS)))
    if image_cells not in IMAGE_CELLS:
        raise SpecError("image_cells", image_cells, "one of " + ", ".join(map(repr, IMAGE_CELLS)))
    n_layers = LLAVA.num_layers(vlm)
    dev = next(vlm.parameters()).device
    draws = samples if corruption != "swap" else 1
    records, values, blocks = [], {s: [] for s in sites}, {s: [] for s in sites}
    for i, case in enumerate(cases):
        ids = image_prompt(tokenizer, vlm, case.text)
        L, img = len(ids), image_positions(ids, vlm)
        tid = answer_id(tokenizer, case.target, field=f"prompts[{i}].target")
        base = {"input_ids": torch.tensor([ids], device=dev), "pixel_values": case.pixels[None].to(dev)}
        # clean run: every layer's state of every site at every position, and the image tokens
        paths = {(s, l): LLAVA.component(TRACE_SITES[s], l) for s in sites for l in range(n_layers)}
        collect = build_graph(vlm, [(p, CollectStates()) for p in [*paths.values(), PROJECTOR]])
        locs = [[list(range(L))] for _ in paths] + [[list(range(len(img)))]]
        (_, states), out = collect(base=base, unit_locations={"base": locs})
        clean = {key: st[0] for key, st in zip(paths, states)}                # (L, d)
        clean_p = float(out.logits[0, -1].softmax(-1)[tid])
        corr, scale = _corruption(vlm, tokenizer, case, i, corruption, states[-1][0], ids, noise, sigma, draws,
                                  seed)
        pixels = case.counterfactual if corruption == "swap" else case.pixels
        if pixels is None:
            raise SpecError(f"prompts[{i}].counterfactual_image", None, "an image for `corruption: swap`")
        corrupt_graph = build_graph(vlm, [(corr.path, AddIntervention())]) if corr.path else None
        corrupt_p = float(_forward(vlm, corrupt_graph, corr, ids, pixels, [(k, None, ()) for k in range(draws)],
                                   None, tid, dev).mean())
        single = [p for p in range(L) if image_cells != "block" or p not in img]
        for s in sites:
            wins = [list(conventions.window(l, 1 if s == "hidden" else window, n_layers)) for l in range(n_layers)]
            graph = build_graph(vlm, ([(corr.path, AddIntervention())] if corr.path else [])
                                + [(LLAVA.component(TRACE_SITES[s], l), RestoreIntervention()) for l in range(n_layers)])
            layer_states = [clean[(s, l)] for l in range(n_layers)]

            def cells(groups):
                rows = [(k, wins[l], pos) for l in range(n_layers) for pos in groups for k in range(draws)]
                probs = [_forward(vlm, graph, corr, ids, pixels, rows[lo:lo + max_batch_rows], layer_states, tid, dev)
                         for lo in range(0, len(rows), max_batch_rows)]
                return torch.cat(probs).view(n_layers, len(groups), draws).mean(2)

            grid = torch.full((n_layers, L), float("nan"))
            if single:
                grid[:, single] = cells([(p,) for p in single])
            values[s].append(grid)
            if image_cells != "each":
                blocks[s].append(cells([tuple(img)])[:, 0])
        tokens = tokenizer.convert_ids_to_tokens(ids)
        subject = corr.units if corruption == "text" else img
        record = {"prompt": case.text, "label": case.label, "answer": case.target, "target": case.target,
                  "tokens": tokens, "columns": [tokenizer.decode([t]) for t in ids], "image_positions": img,
                  "subject_positions": subject,
                  "corruption": corruption, "clean_prob": clean_p, "corrupted_prob": corrupt_p, "sigma": scale}
        if image_cells != "each":
            record["image_block"] = {s: blocks[s][-1].tolist() for s in sites}
        records.append(record)
    grids = {}
    for s in sites:
        width = max(v.shape[1] for v in values[s])
        stacked = torch.stack([torch.nn.functional.pad(v, (0, width - v.shape[1]), value=float("nan"))
                               for v in values[s]])
        grids[s] = Grid(s, TRACE_SITES[s], "prob", list(range(n_layers)), stacked, [v.shape[1] for v in values[s]])
    return grids, records


def _corruption(vlm, tokenizer, case: VLMCase, i: int, corruption: str, image_tokens: torch.Tensor, ids,
                noise: float, sigma: float | None, draws: int, seed: int) -> tuple[_Corruption, float | None]:
    """The corruption of case `i` and its σ; its draws are seeded by the case itself (`case_identity`)."""
    if corruption == "swap":
        return _Corruption(None, [], None), None
    if corruption == "noise":
        units, path, scale = list(range(image_tokens.shape[0])), PROJECTOR, sigma or float(image_tokens.std())
    else:
        if case.constraint is None:
            raise SpecError(f"prompts[{i}].constraint", None, "the words of the prompt to corrupt, for `corruption: text`")
        units = constraint_positions(tokenizer, vlm, case.text, case.constraint, f"prompts[{i}].constraint")
        embed = vlm.get_input_embeddings()
        path = EMBED
        scale = sigma or float(embed(torch.tensor([ids[p] for p in units], device=embed.weight.device)).float().std())
    g = conventions.noise_generator(seed, *case_identity(case))
    eps = torch.randn(draws, len(units), image_tokens.shape[-1], generator=g) * noise * scale
    return _Corruption(path, units, eps), scale


def case_identity(case: VLMCase) -> tuple:
    """What a case's noise is keyed by (`conventions.noise_seed`): its text, its constraint and the sha256
    of its image's pixels, never its index among the spec's prompts."""
    pixels = case.pixels.detach().to("cpu", torch.float32).contiguous()
    return case.text, case.constraint or "", hashlib.sha256(pixels.numpy().tobytes()).digest()


def _forward(vlm, graph, corr: _Corruption, ids, pixels, rows, layer_states, tid, dev) -> torch.Tensor:
    """p(target) at the last position for each row ``(draw, window, positions)``: the corruption's
    draw added, and (with `layer_states`) the clean states at `positions` restored in `window`'s layers."""
    n = len(rows)
    base = {"input_ids": torch.tensor([ids] * n, device=dev), "pixel_values": pixels[None].expand(n, -1, -1, -1).to(dev)}
    if graph is None:
        return vlm(**base).logits[:, -1].softmax(-1)[:, tid].float().cpu()
    locs, subspaces, reps = [], [], {}
    keys = list(graph.sorted_keys)
    if corr.path is not None:
        locs.append([corr.units] * n)
        subspaces.append([[0]] * n)
        reps[keys.pop(0)] = torch.stack([corr.eps[k] for k, _, _ in rows]).to(dev)
    for layer, key in enumerate(keys):
        locs.append([list(pos) for _, _, pos in rows])
        subspaces.append([[0] if layer in win else [] for _, win, _ in rows])
        reps[key] = torch.stack([layer_states[layer][list(pos)] for _, _, pos in rows]).to(dev)
    _, out = graph(base=base, unit_locations={"base": locs}, source_representations=reps, subspaces=subspaces)
    return out.logits[:, -1].softmax(-1)[:, tid].float().cpu()
