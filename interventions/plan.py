"""Compile a spec into pyvene graphs and memory-bounded chunks of rows, without running the model.

A *row* is one counterfactual forward pass: a prompt, a variant of its base input
(one noise draw, or the swapped/base prompt) and at most one *cell* to restore
(a site at one or more layers, at one or more positions). All rows of a grid, all
noise samples and all prompts are packed into the batch dimension; a *chunk*
holds at most ``max_batch_rows`` rows that share one graph.

>>> plan = compile_spec(spec, model, tokenizer)                   # doctest: +SKIP
>>> graph = plan.graphs["block_output"]                            # an IntervenableModel
>>> plan.unit_locations(plan.chunks[0])["base"][1][:2]           # doctest: +SKIP
[[5], [6]]

The only model computation in compiling is the embedding lookup that measures
the noise scale σ when the spec does not give `sigma`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import torch

from .errors import SpecError
from .prompts import Encoded, answer_id, check_aligned, columns, encode
from .pv import AddIntervention, CollectStates, RestoreIntervention, build_graph
from .sites import SiteTable, site_table
from .spec import TRACE_SITES, PatchSpec, TraceSpec

log = logging.getLogger(__name__)

EMBED = "embed"


@dataclass(frozen=True)
class Cell:
    """One grid cell: restore `site` at model `layers` and token `positions`."""

    grid: str
    site: str
    prompt: int
    layer_index: int
    column: int
    layers: tuple[int, ...]
    positions: tuple[int, ...]


@dataclass(frozen=True)
class Row:
    prompt: int
    variant: int
    cell: Cell | None = None   # None: the plain base run (corrupted baseline)


@dataclass
class Prompt:
    """A prompt ready to run: the intervened base input, the cached source, the grid columns."""

    base: Encoded
    source: Encoded
    columns: list[tuple[str, tuple[int, ...]]]
    target_id: int | None = None
    counterfactual_id: int | None = None


@dataclass(frozen=True)
class GridAxes:
    name: str
    site: str
    layers: tuple[int, ...]        # the layer axis: model layer indices (0 for `embed`)
    metric: str


@dataclass
class Chunk:
    """Rows run in one forward pass through `graph`.

    Positions before `prefix` are not recomputed: a restore at position ``>= prefix``
    cannot change them (causal attention), so they come from the baseline run's
    key/value cache and the rows feed only tokens ``prefix:``.
    """

    graph: str
    rows: list[Row]
    prefix: int = 0

    @property
    def baseline(self) -> bool:
        return self.rows[0].cell is None


@dataclass
class Plan:
    """Everything needed to run a spec: graphs, prompts, grids and chunks."""

    spec: TraceSpec | PatchSpec
    model: torch.nn.Module
    tokenizer: object
    table: SiteTable
    prompts: list[Prompt]
    grids: dict[str, GridAxes]
    graphs: dict[str, object]           # site -> IntervenableModel
    nodes: dict[str, list[tuple[str, int | None]]]   # site -> (node site, layer) per intervention
    collect_graph: object
    collect_nodes: list[tuple[str, int | None]]
    chunks: list[Chunk]
    variants: int
    noise: list[torch.Tensor] | None = None   # per prompt: (variants, n_subject, d), already scaled
    sigma: float | None = None
    shares_prefix: bool = False                # some chunk reads the baseline key/value cache
    noop_cells: list[Cell] = field(default_factory=list)   # equal to the baseline run; not run

    @property
    def num_rows(self) -> int:
        return sum(len(c.rows) for c in self.chunks)

    def unit_locations(self, chunk: Chunk) -> dict:
        """pyvene ``unit_locations`` for `chunk`: ``{"base": [per node: [per row: positions]]}``."""
        return {"base": [self._node_locations(chunk, node) for node in self.nodes[chunk.graph]]}

    def subspaces(self, chunk: Chunk) -> list:
        """Per node, per row: ``[0]`` where the row's cell restores this node, ``[]`` elsewhere."""
        out = []
        for site, layer in self.nodes[chunk.graph]:
            if site == "noise":
                out.append(None)
                continue
            out.append([[0] if _restores(r.cell, site, layer) else [] for r in chunk.rows])
        return out

    def noised(self, chunk: Chunk, row: Row) -> list[int]:
        """Subject positions of `row` that `chunk` computes (absolute positions)."""
        return [p for p in self.prompts[row.prompt].base.subject if p >= chunk.prefix]

    def _node_locations(self, chunk: Chunk, node) -> list[list[int]]:
        site, layer = node
        shift = chunk.prefix
        if site == "noise":
            # a row whose subject lies wholly in the cached prefix gets zero noise at position 0
            k = max(1, max(len(self.noised(chunk, r)) for r in chunk.rows))
            return [_pad([p - shift for p in self.noised(chunk, r)] or [0], k) for r in chunk.rows]
        k = max((len(r.cell.positions) for r in chunk.rows if r.cell), default=1)
        return [_pad([p - shift for p in r.cell.positions], k) if _restores(r.cell, site, layer) else [0] * k
                for r in chunk.rows]


def _restores(cell: Cell | None, site: str, layer: int | None) -> bool:
    return cell is not None and cell.site == site and (layer is None or layer in cell.layers)


def _pad(positions, k: int) -> list[int]:
    """Pad to `k` units by repeating the first; restoring a position twice is idempotent."""
    positions = list(positions)
    return positions + [positions[0]] * (k - len(positions))


def window(layer: int, size: int, num_layers: int) -> tuple[int, ...]:
    """ROME's window of `size` layers centred on `layer`, clipped to the model."""
    return tuple(range(max(0, layer - size // 2), min(num_layers, layer - (-size // 2))))


def resolve_layers(spec, num_layers: int) -> tuple[int, ...]:
    if spec.layers == "all":
        return tuple(range(num_layers))
    out = []
    for i, layer in enumerate(spec.layers):
        if not -num_layers <= layer < num_layers:
            raise SpecError(f"layers[{i}]", layer, f"a layer in [-{num_layers}, {num_layers - 1}] "
                                                   f"(the model has {num_layers} layers)")
        out.append(layer % num_layers)
    return tuple(sorted(set(out)))


def compile_spec(spec: TraceSpec | PatchSpec, model: torch.nn.Module, tokenizer,
                 *, max_batch_rows: int | None = None, share_prefix: bool = True) -> Plan:
    """Compile `spec` for `model` into a `Plan`. Raises `SpecError` for inputs the model cannot take.

    `share_prefix=False` recomputes every row from position 0 (same results, slower).
    """
    table = site_table(model)
    num_layers = table.num_layers(model)
    layers = resolve_layers(spec, num_layers)
    if isinstance(spec, TraceSpec):
        prompts = _trace_prompts(spec, tokenizer)
        grid_sites = {name: TRACE_SITES[name] for name in spec.sites}
    else:
        prompts = _patch_prompts(spec, tokenizer)
        grid_sites = {site: site for site in spec.sites}
    for site in grid_sites.values():
        table.component(site, 0)   # unknown site for this family -> SpecError
    grids, cells = {}, {}
    for name, site in grid_sites.items():
        layered = table.is_layered(site)
        size = 1 if (name == "hidden" or not layered) else spec.window
        axis = layers if layered else (0,)
        grids[name] = GridAxes(name, site, axis, "prob" if isinstance(spec, TraceSpec) else spec.metric)
        cells[name] = [Cell(name, site, pi, li, ci, window(layer, size, num_layers) if layered else (),
                            cols[1])
                       for pi, p in enumerate(prompts) for li, layer in enumerate(axis)
                       for ci, cols in enumerate(p.columns)]
    noise, sigma, variants = None, None, 1
    if isinstance(spec, TraceSpec) and spec.corruption == "noise":
        sigma = spec.sigma if spec.sigma is not None else subject_sigma(model, table, prompts)
        noise = [draw_noise(spec, p, sigma, _embed_dim(model, table)) for p in prompts]
        variants = spec.samples
    nodes, graphs = {}, {}
    for name, site in grid_sites.items():
        used = sorted({layer for c in cells[name] for layer in c.layers}) if table.is_layered(site) else [None]
        nodes[site] = ([("noise", None)] if noise is not None else []) + [(site, layer) for layer in used]
        graphs[site] = build_graph(model, [_node(table, n) for n in nodes[site]])
    collect_nodes = [n for site in nodes for n in nodes[site] if n[0] != "noise"]
    collect_graph = build_graph(model, [(table.component(s, l), CollectStates()) for s, l in collect_nodes])
    size = max_batch_rows or spec.max_batch_rows
    diverge = [first_difference(p, noise is not None) for p in prompts]
    noop = {name: [c for c in cells[name] if max(c.positions) < diverge[c.prompt]] for name in cells}
    cells = {name: [c for c in cells[name] if max(c.positions) >= diverge[c.prompt]] for name in cells}
    chunks = []
    for block in _blocks(prompts, variants, _cache_bytes_per_token(model)):
        # Baseline rows (no restore) first: they give the key/value caches, and patch
        # metrics need the base run's top-1.
        baseline = [Row(pi, v) for pi in block for v in range(variants)]
        chunks += [Chunk(next(iter(graphs)), baseline[i:i + size]) for i in range(0, len(baseline), size)]
        for name, site in grid_sites.items():
            rows = [Row(c.prompt, v, c) for c in cells[name] if c.prompt in block for v in range(variants)]
            chunks += _chunk(site, rows, prompts, size, share_prefix)
    return Plan(spec, model, tokenizer, table, prompts, grids, graphs, nodes, collect_graph, collect_nodes,
                chunks, variants, noise, sigma, shares_prefix=any(c.prefix for c in chunks),
                noop_cells=[c for name in noop for c in noop[name]])


def first_difference(prompt: Prompt, noised: bool) -> int:
    """The first position where the base run's input differs from the source run's.

    Before it the two runs compute identical states (causal attention), so restoring
    a source state there changes nothing and the cell equals the baseline run.
    """
    if noised:
        return min(prompt.base.subject)
    same = [a == b for a, b in zip(prompt.base.ids, prompt.source.ids)]
    return same.index(False) if False in same else len(same)


def _node(table: SiteTable, node):
    site, layer = node
    if site == "noise":
        return table.component(EMBED), AddIntervention()
    return table.component(site, layer), RestoreIntervention()


#: Key/value caches of the baseline runs held at once; prompts are run in blocks under it.
CACHE_BUDGET_BYTES = 512 * 2**20


def _cache_bytes_per_token(model) -> int:
    cfg = model.config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * heads * head_dim * next(model.parameters()).element_size()


def _blocks(prompts: list[Prompt], variants: int, per_token: int) -> list[list[int]]:
    """Consecutive prompts whose baseline caches fit `CACHE_BUDGET_BYTES` together."""
    blocks, current, used = [], [], 0
    for i, p in enumerate(prompts):
        need = variants * len(p.base) * per_token
        if current and used + need > CACHE_BUDGET_BYTES:
            blocks.append(current)
            current, used = [], 0
        current.append(i)
        used += need
    return blocks + [current]


def _chunk(graph: str, rows: list[Row], prompts: list[Prompt], size: int, share_prefix: bool) -> list[Chunk]:
    """Group rows by shared prefix, then fill chunks up to `size` full-length rows' worth of tokens.

    A row computes ``len(prompt) - prefix`` tokens, so short continuations pack more rows
    into one pass at the same activation memory. Rows of similar length go together.
    """
    groups: dict[int, list[Row]] = {}
    for r in rows:
        groups.setdefault(min(r.cell.positions) if share_prefix else 0, []).append(r)
    chunks = []
    for prefix, group in sorted(groups.items()):
        group.sort(key=lambda r: len(prompts[r.prompt].base))
        budget = size * max(len(prompts[r.prompt].base) for r in group)
        current: list[Row] = []
        for r in group:
            width = len(prompts[r.prompt].base) - prefix     # the longest so far: rows are sorted
            if current and (len(current) + 1) * width > budget:
                chunks.append(Chunk(graph, current, prefix))
                current = []
            current.append(r)
        chunks.append(Chunk(graph, current, prefix))
    return chunks


def _trace_prompts(spec: TraceSpec, tokenizer) -> list[Prompt]:
    out = []
    for i, p in enumerate(spec.prompts):
        where = f"prompts[{i}]"
        clean = encode(tokenizer, p.prompt, subject=p.subject, field=where)
        base = clean
        if spec.corruption == "swap":
            if p.counterfactual_subject is None:
                raise SpecError(f"{where}.counterfactual_subject", None,
                                "a replacement subject, because `corruption` is 'swap'")
            swapped = p.prompt.replace(p.subject, p.counterfactual_subject, 1)
            base = encode(tokenizer, swapped, subject=p.counterfactual_subject, field=where)
            check_aligned(clean, base, f"{where}.counterfactual_subject")
        out.append(Prompt(base, clean, columns(spec.positions, clean, "positions"),
                          target_id=_answer(tokenizer, p.target, f"{where}.target")))
    return out


def _patch_prompts(spec: PatchSpec, tokenizer) -> list[Prompt]:
    out = []
    for i, p in enumerate(spec.prompts):
        where = f"prompts[{i}]"
        base = encode(tokenizer, p.base, subject=p.subject, field=where)
        source = encode(tokenizer, p.source, field=where)
        check_aligned(base, source, f"{where}.source")
        out.append(Prompt(base, source, columns(spec.positions, base, "positions"),
                          target_id=_answer(tokenizer, p.target, f"{where}.target"),
                          counterfactual_id=_answer(tokenizer, p.counterfactual_target,
                                                    f"{where}.counterfactual_target")))
    return out


def _answer(tokenizer, text: str | None, field: str) -> int | None:
    """The scored token of an optional target; None defers to the model's top-1."""
    return None if text is None else answer_id(tokenizer, text, field=field)


def _embed_dim(model, table: SiteTable) -> int:
    return table.module(model, EMBED).weight.shape[1]


@torch.no_grad()
def subject_sigma(model, table: SiteTable, prompts: list[Prompt]) -> float:
    """The std of the subject tokens' embeddings over all prompts (ROME's noise unit)."""
    embed = table.module(model, EMBED)
    vecs = [embed(torch.tensor([p.source.ids], device=embed.weight.device))[0, list(p.source.subject)]
            for p in prompts]
    return float(torch.cat(vecs).float().std())


def noise_seed(seed: int, prompt: Encoded) -> int:
    """Seed per prompt from the spec's seed and the prompt's text, so a prompt's noise does
    not depend on which other prompts share the spec or the batch."""
    digest = hashlib.sha256(f"{seed}\0{prompt.text}\0{prompt.subject}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def draw_noise(spec: TraceSpec, prompt: Prompt, sigma: float, dim: int) -> torch.Tensor:
    """(samples, n_subject, d) Gaussian noise times ``noise * sigma``, reproducible from `seed`."""
    gen = torch.Generator().manual_seed(noise_seed(spec.seed, prompt.source))
    z = torch.randn(spec.samples, len(prompt.source.subject), dim, generator=gen)
    return z * (spec.noise * sigma)
