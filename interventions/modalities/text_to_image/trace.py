"""Causal tracing in text-to-image models, compiled to pyvene graphs.

Two localizations from Basu et al., both scored on generated images:

- **Text encoder** (Diff-QuickFix): run the text encoder on a corrupted prompt (the
  subject swapped for a counterfactual, or Gaussian noise on the subject's token
  embeddings), restore the clean state of one site (``text_hidden``, ``text_mlp``,
  ``text_attention``) at one layer (or a window) and one token, and generate from the
  resulting context. A single causal state shows up as one cell that brings the
  clean concept back.
- **UNet cross-attention** (LocoGen): give the clean prompt's context to a window of
  consecutive ``attn2`` layers (through their ``to_k``/``to_v`` inputs) and the
  corrupted context to the others, at every sampling step.

The metric of a cell is the share of its images (one per seed, the same seeds for every
cell) in which the evaluator sees the `target` (a colour or a shape word, by default the
subject). The grids hold that share; the indirect effect is the share minus the
corrupted run's. Text-encoder windows and noise seeds follow `interventions.core.conventions`.

>>> pipe = load_pipeline("shapes-diffusion")                                        # doctest: +SKIP
>>> spec = parse_spec({"kind": "trace", "modality": "text-to-image", "prompts": [
...     {"prompt": "a red circle", "subject": "red", "counterfactual_subject": "blue"}]})  # doctest: +SKIP
>>> result = trace(spec, pipe)                                                      # doctest: +SKIP
>>> result.grids["text_hidden"].values.shape          # prompt, layer, position     # doctest: +SKIP
torch.Size([1, 2, 8])
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from interventions.core import conventions
from interventions.core.errors import SpecError
from interventions.core.prompts import overlapping
from interventions.engine.pv import AddIntervention, CollectStates, RestoreIntervention, build_graph
from interventions.engine.result import Grid, Result
from interventions.modalities.text_to_image.pipeline import DiffusionPipe, DiffusionSites
from interventions.testbeds import Evaluator

log = logging.getLogger(__name__)
TEXT_SITES = ("text_hidden", "text_mlp", "text_attention")


@dataclass
class Corrupted:
    """One prompt's clean and corrupted text-encoder inputs."""

    clean_ids: torch.Tensor            # (1, L)
    corrupt_ids: torch.Tensor          # (1, L)
    subject: list[int]                 # subject token positions
    noise: torch.Tensor | None         # (samples, len(subject), d) for noise corruption, else None
    tokens: list[str]


def subject_positions(pipe: DiffusionPipe, prompt: str, subject: str, field: str) -> list[int]:
    """Token positions of `subject` in `prompt` (the tokenizer's own offsets)."""
    if subject not in prompt:
        raise SpecError(field, subject, f"a substring of the prompt {prompt!r}")
    start = prompt.index(subject)
    end = start + len(subject)
    enc = pipe.tokenizer(prompt, return_offsets_mapping=True, padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, truncation=True)
    out = overlapping(enc["offset_mapping"], start, end)
    if not out:
        raise SpecError(field, subject, f"a substring of {prompt!r} that covers at least one token")
    unk = pipe.tokenizer.unk_token_id
    if unk is not None and any(enc["input_ids"][i] == unk for i in out):
        raise SpecError(field, subject, "words in the tokenizer's vocabulary (this one maps to the unknown token)")
    return out


def corrupt(pipe: DiffusionPipe, spec, i: int, sigma: float | None) -> Corrupted:
    """The corrupted input of prompt `i`: a swapped subject or seeded noise on its embeddings."""
    p = spec.prompts[i]
    subject = subject_positions(pipe, p.prompt, p.subject, f"prompts[{i}].subject")
    clean = pipe.tokenize([p.prompt])
    tokens = pipe.tokenizer.convert_ids_to_tokens(clean[0].tolist())
    if spec.corruption == "swap":
        if p.counterfactual_subject is None:
            raise SpecError(f"prompts[{i}].counterfactual_subject", None, "a word for `corruption: swap`")
        other = p.prompt.replace(p.subject, p.counterfactual_subject, 1)
        swapped = pipe.tokenize([other])
        if len(subject_positions(pipe, other, p.counterfactual_subject, f"prompts[{i}].counterfactual_subject")) \
                != len(subject):
            raise SpecError(f"prompts[{i}].counterfactual_subject", p.counterfactual_subject,
                            f"as many tokens as the subject {p.subject!r} ({len(subject)})")
        return Corrupted(clean, swapped, subject, None, tokens)
    g = conventions.noise_generator(spec.seed, p.prompt, p.subject)    # keyed by the prompt, not its index
    d = pipe.text_encoder.config.hidden_size
    noise = torch.randn(spec.samples, len(subject), d, generator=g) * spec.noise * sigma
    return Corrupted(clean, clean, subject, noise, tokens)


def embedding_sigma(pipe: DiffusionPipe, spec) -> float:
    """The std of the subjects' token embeddings (ROME's scale for noise)."""
    emb = pipe.text_encoder.get_input_embeddings().weight
    ids = []
    for i, p in enumerate(spec.prompts):
        pos = subject_positions(pipe, p.prompt, p.subject, f"prompts[{i}].subject")
        ids += pipe.tokenize([p.prompt])[0, pos].tolist()
    return float(emb[torch.tensor(ids)].detach().std())


# ------------------------------------------------------------------------- text encoder
def text_contexts(pipe: DiffusionPipe, c: Corrupted, site: str, cells: list[tuple[list[int], int]],
                  sample: int | None) -> torch.Tensor:
    """UNet contexts ``Float[Tensor, "cells L d"]``: the corrupted text-encoder run with the clean
    `site` state restored, for each cell ``(layers, position)``, in one batched pyvene call."""
    sites = DiffusionSites(pipe)
    enc = pipe.text_encoder
    layers = sorted({l for ls, _ in cells for l in ls})
    paths = [sites.text(site, l) + ".output" for l in layers]
    dev = pipe.device
    with torch.no_grad():
        collect = build_graph(enc, [(p, CollectStates()) for p in paths])
        L = c.clean_ids.shape[1]
        (_, states), _ = collect(base={"input_ids": c.clean_ids}, unit_locations={
            "base": [[list(range(L))] for _ in paths]})
        clean = {l: s[0] for l, s in zip(layers, states)}                    # (L, d) per layer
        nodes = [(p, RestoreIntervention()) for p in paths]
        noise_node = c.noise is not None
        if noise_node:
            nodes = [(sites.text("text_embed") + ".output", AddIntervention())] + nodes
        graph = build_graph(enc, nodes)
        n = len(cells)
        locs = [[[pos] for _, pos in cells] for _ in layers]
        subspaces = [[[0] if l in ls else [] for ls, _ in cells] for l in layers]
        reps = {key: torch.stack([clean[l][pos][None] for _, pos in cells]).to(dev)
                for key, l in zip(graph.sorted_keys[int(noise_node):], layers)}
        if noise_node:
            locs = [[list(c.subject)] * n] + locs
            subspaces = [[[0]] * n] + subspaces
            reps[graph.sorted_keys[0]] = c.noise[sample][None].expand(n, -1, -1).to(dev)
        _, out = graph(base={"input_ids": c.corrupt_ids.expand(n, -1)}, unit_locations={"base": locs},
                       source_representations=reps, subspaces=subspaces)
    return out.last_hidden_state


def corrupted_context(pipe: DiffusionPipe, c: Corrupted, sample: int | None) -> torch.Tensor:
    """The corrupted run's context ``(1, L, d)`` (no restore)."""
    if c.noise is None:
        return pipe.encode_ids(c.corrupt_ids)
    graph = build_graph(pipe.text_encoder, [(DiffusionSites(pipe).text("text_embed") + ".output", AddIntervention())])
    with torch.no_grad():
        _, out = graph(base={"input_ids": c.corrupt_ids}, unit_locations={"base": [[list(c.subject)]]},
                       source_representations={graph.sorted_keys[0]: c.noise[sample][None].to(pipe.device)},
                       subspaces=[[[0]]])
    return out.last_hidden_state


def text_cells(spec, n_layers: int, length: int, site: str) -> tuple[list[int], list[tuple[list[int], int]]]:
    """(grid layers, cells): every (layer window, position) of the grid, row-major."""
    layers = list(range(n_layers)) if spec.layers == "all" else [l % n_layers for l in spec.layers]
    for l in (spec.layers if spec.layers != "all" else []):
        if not -n_layers <= l < n_layers:
            raise SpecError("layers", l, f"text-encoder layers in {-n_layers}..{n_layers - 1}")
    w = 1 if site == "text_hidden" else spec.window
    cells = []
    for l in layers:
        cells += [(list(conventions.window(l, w, n_layers)), pos) for pos in range(length)]
    return layers, cells


# ------------------------------------------------------------------------- UNet cross-attention
def cross_attention_hook(pipe: DiffusionPipe, windows: list[list[int]], clean2: torch.Tensor):
    """A `DiffusionPipe.sample` hook: row r's UNet call restores the clean context in the ``attn2``
    layers ``windows[r]``, the corrupted one elsewhere.

    The graph restores the *outputs* of ``to_k``/``to_v`` to those projections of the clean context,
    which equals feeding them the clean context. (pyvene writes ``.input`` interventions in place
    into the input tensor, and every ``attn2`` shares one ``encoder_hidden_states`` tensor, so an
    input restore at one layer would leak into all later ones.)

    clean2: ``Float[Tensor, "2 L d"]``, the (unconditional, clean) contexts."""
    names = DiffusionSites(pipe).cross_attention
    projections = [pipe.unet.get_submodule(f"{name}.{proj}") for name in names for proj in ("to_k", "to_v")]
    paths = [f"{name}.{proj}.output" for name in names for proj in ("to_k", "to_v")]
    graph = build_graph(pipe.unet, [(p, RestoreIntervention()) for p in paths])
    with torch.no_grad():
        clean_out = [proj(clean2.to(pipe.device)) for proj in projections]       # (2, L, out) each
    L = clean2.shape[1]

    def hook(step, rows, x2, t, context2):
        n = len(x2) // 2
        win = windows[rows]          # the windows of this batch's rows (a slice of the sampler's)
        locs = [[list(range(L))] * (2 * n)] * len(paths)
        subspaces = [[[]] * n + [[0] if j // 2 in w else [] for w in win] for j in range(len(paths))]
        reps = {key: torch.cat([out[:1].expand(n, -1, -1), out[1:].expand(n, -1, -1)])
                for key, out in zip(graph.sorted_keys, clean_out)}
        _, out = graph(base={"sample": x2, "timestep": t, "encoder_hidden_states": context2},
                       unit_locations={"base": locs}, source_representations=reps, subspaces=subspaces)
        return out.sample

    return hook


def attn_windows(n_layers: int, window: int) -> list[list[int]]:
    window = min(window, n_layers)
    return [list(range(s, s + window)) for s in range(n_layers - window + 1)]


# ------------------------------------------------------------------------- the whole trace
def trace(spec, pipe: DiffusionPipe, evaluator: Evaluator | None = None) -> Result:
    """Run a diffusion `kind: trace` spec: one grid per site, values = share of images showing the target."""
    evaluator = evaluator or pipe.meta.get("evaluator")
    if evaluator is None:
        raise SpecError("model", spec.model, "a pipeline with an image evaluator (the testbed), or pass `evaluator=`")
    sigma = spec.sigma or (embedding_sigma(pipe, spec) if spec.corruption == "noise" else None)
    seeds = list(range(spec.seed, spec.seed + spec.images))
    samples = 1 if spec.corruption == "swap" else spec.samples
    sites = DiffusionSites(pipe)
    uncond = pipe.encode([""])[0]
    records, grid_layers = [], {}
    values: dict[str, list[torch.Tensor]] = {s: [] for s in spec.sites}
    for i, p in enumerate(spec.prompts):
        c = corrupt(pipe, spec, i, sigma)
        score = _Scorer(pipe, evaluator, seeds, samples, uncond, p.target or p.subject)
        draw = (lambda k: k) if c.noise is not None else (lambda k: None)
        clean_ctx = pipe.encode_ids(c.clean_ids)
        clean_p = float(score(lambda k: clean_ctx)[0])
        corrupt_p = float(score(lambda k: corrupted_context(pipe, c, draw(k)))[0])
        # `prompt`: up to and including <eos> (SD's tokenizer pads with <eos> itself, so count, not compare)
        length = len(pipe.tokenizer(p.prompt, truncation=True, max_length=c.clean_ids.shape[1])["input_ids"]) \
            if spec.positions == "prompt" else c.clean_ids.shape[1]
        for site in spec.sites:
            got, grid_layers[site] = _site_scores(spec, pipe, sites, c, site, length, score, draw,
                                                  torch.cat([uncond[None], clean_ctx]))
            values[site].append(got)
        records.append({"prompt": p.prompt, "subject": p.subject, "answer": score.target, "target": score.target,
                        "tokens": c.tokens, "columns": c.tokens[:length], "subject_positions": c.subject,
                        "clean_prob": clean_p, "corrupted_prob": corrupt_p,
                        "corrupted_prompt": p.prompt.replace(p.subject, p.counterfactual_subject, 1)
                        if spec.corruption == "swap" else f"{p.prompt} (noise on {p.subject!r})"})
        log.info("%s: clean %.2f corrupted %.2f", p.prompt, clean_p, corrupt_p)
    meta = {"images_per_cell": len(seeds), "seeds": [seeds[0], seeds[-1]], "steps": pipe.steps,
            "guidance": pipe.guidance, "sigma": sigma, "cross_attention_layers": sites.cross_attention}
    return Result("trace", spec.model, spec, records, _grids(spec.sites, values, grid_layers), meta)


class _Scorer:
    """Share of images showing `target`, per context row; image j of the seeds uses noise sample
    j % samples, so every cell sees the same (seed, sample) pairs."""

    def __init__(self, pipe: DiffusionPipe, evaluator: Evaluator, seeds: list[int], samples: int, uncond,
                 target: str):
        self.pipe, self.evaluator, self.seeds, self.uncond, self.target = pipe, evaluator, seeds, uncond, target
        self.per_sample = [[s for j, s in enumerate(seeds) if j % samples == k] for k in range(samples)]

    def __call__(self, contexts_for_sample, unet_hook=None) -> torch.Tensor:
        hits = None
        for k, seeds in enumerate(self.per_sample):
            n = len(seeds)
            if n == 0:                                         # more noise draws than images
                continue
            ctx = contexts_for_sample(k)                       # (cells, L, d)
            rows = ctx.repeat_interleave(n, dim=0)
            images = self.pipe.sample(rows, seeds * len(ctx), uncond=self.uncond,
                                      unet_hook=None if unet_hook is None else unet_hook(len(ctx), n))
            shows = self.evaluator.shows(images, self.target).float().view(len(ctx), n).sum(1)
            hits = shows if hits is None else hits + shows
        return hits / len(self.seeds)


def _site_scores(spec, pipe: DiffusionPipe, sites: DiffusionSites, c, site: str, length: int, score: _Scorer,
                 draw, clean2: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """One prompt's row of a site's grid: (values [layers, positions], the grid's layer labels)."""
    if site in TEXT_SITES:
        layers, cells = text_cells(spec, sites.text_layers, length, site)
        got = score(lambda k: text_contexts(pipe, c, site, cells, draw(k)))
        return got.view(len(layers), length), layers
    wins = attn_windows(len(sites.cross_attention), spec.attn_window)

    def hook(n_ctx, n):
        return cross_attention_hook(pipe, [w for w in wins for _ in range(n)], clean2)

    got = score(lambda k: corrupted_context(pipe, c, draw(k)).expand(len(wins), -1, -1), unet_hook=hook)
    return got.view(len(wins), 1), [w[0] for w in wins]


def _grids(site_names, values: dict, grid_layers: dict) -> dict[str, Grid]:
    grids = {}
    for site in site_names:
        width = max(v.shape[1] for v in values[site])
        stacked = torch.stack([torch.nn.functional.pad(v, (0, width - v.shape[1]), value=float("nan"))
                               for v in values[site]])
        grids[site] = Grid(site, site, "prob", grid_layers[site], stacked, [v.shape[1] for v in values[site]])
    return grids
