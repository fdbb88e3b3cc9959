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

One plan serves language models and VLMs. A vision-language spec's prompts come
from `interventions.modalities.vision_language.llava.vlm_prompts`, which only prepares inputs: the token ids
(image tokens included), the image-token positions, and the language model's input
embeddings with the image features merged in (`Encoded.embeds`). From there on
everything here and in `engine` is the same; the noise node sits on the embedding
lookup's output, or on layer 0's input for prompts that run as embeddings.

The only model computation in compiling is the embedding lookup that measures
the noise scale σ when the spec does not give `sigma`, and, for a VLM, its vision
tower and projector, once per image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from interventions.core.conventions import answer_id, noise_generator, window
from interventions.core.errors import SpecError
from interventions.core.memory import Costs
from interventions.core.prompts import Encoded, check_aligned, columns, encode
from interventions.core.units import human
from interventions.engine.pv import AddIntervention, CollectStates, RestoreIntervention, UnitRestore, build_graph
from interventions.models.sites import SiteTable, get_module, site_table
from interventions.spec import TRACE_SITES, PatchSpec, TraceSpec

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
    units: tuple[int, ...] = (0,)   # the pyvene subspaces the cell restores: 0 (the whole state), or features
    first_layer: int = 0            # the first layer of the prompt's sequence its restore can change (`_first`)


@dataclass(frozen=True)
class UnitAxis:
    """A grid whose rows are units of a basis at one site and layer: a dictionary's features.

    A cell restores one row's units (a feature, or several together) from the source and keeps the
    rest of the base state (``x + Σ_u (a_source[u] - a_base[u]) W_dec[u]``, `pv.UnitRestore`); `basis`
    has ``encode(x)`` (``... d -> ... n``) and ``W_dec`` (``n d``), as `interventions.features.Dictionary`
    does. `units`: per row, a unit or a tuple of units."""

    name: str
    site: str
    layer: int
    units: tuple[int | tuple[int, ...], ...]
    basis: torch.nn.Module
    edit: str = "restore"        # or "zero", "clamp" (to `value`), "add" (`value`): `pv.UnitRestore`'s modes
    value: float = 0.0

    def rows(self) -> list[tuple[int, ...]]:
        """Each row's units as a tuple."""
        return [u if isinstance(u, tuple) else (u,) for u in self.units]


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
    identity: tuple = ()          # what the prompt's noise is keyed by (`conventions.noise_seed`)
    record: dict = field(default_factory=dict)   # modality-specific entries of its result record
    context_columns: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)   # over `base.context`

    def __post_init__(self):
        self.identity = self.identity or (self.source.text, self.source.subject)


@dataclass(frozen=True)
class GridAxes:
    name: str
    site: str
    layers: tuple[int, ...]        # the row axis: model layer indices (0 for `embed`), or the units
    metric: str
    axis: str = "layer"            # what the rows are: "layer", or "feature" (a `UnitAxis`)
    layer: int | None = None       # a feature grid's one layer
    context: bool = False          # columns over the prompts' context sequence (`Prompt.context_columns`)


@dataclass
class Chunk:
    """Rows run in one forward pass through `graph`.

    Positions before `prefix` are not recomputed: a restore at position ``>= prefix``
    cannot change them (causal attention), so they come from the baseline run's
    key/value cache and the rows feed only tokens ``prefix:``.

    Layers before `start` are not computed either: a restore at layer ``>= start``
    cannot change them, so their outputs are the baseline run's, read from its cache.
    """

    graph: str
    rows: list[Row]
    prefix: int = 0
    start: int = 0
    block: int = 0          # the prompt block (`Plan.blocks`) the rows belong to

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
    graphs: dict[str, object]           # site (a feature grid: its name) -> IntervenableModel
    nodes: dict[str, list[tuple[str, int | None]]]   # the same keys -> (node site, layer) per intervention
    collect_graph: object
    collect_nodes: list[tuple[str, int | None]]
    chunks: list[Chunk]
    variants: int
    noise: list[torch.Tensor] | None = None   # per prompt: (variants, n_subject, d), already scaled
    sigma: float | None = None
    shares_prefix: bool = False                # some chunk reads the baseline key/value cache
    skips_layers: bool = False                 # some chunk reads the baseline layer outputs
    blocks: list[list[int]] = field(default_factory=list)   # prompts whose states are held together
    clean_rows: int = 1                        # prompts per clean forward pass
    memory: int | None = None                  # the budget chunks were sized for (bytes), if any
    layer_modules: list[torch.nn.Module] = field(default_factory=list)   # the decoder layers, in order
    noop_cells: list[Cell] = field(default_factory=list)   # equal to the baseline run; not run

    @property
    def num_rows(self) -> int:
        return sum(len(c.rows) for c in self.chunks)

    def columns(self, grid: str, prompt: int) -> list[tuple[str, tuple[int, ...]]]:
        """The columns of `grid` for one prompt: over its sequence, or over its context."""
        p = self.prompts[prompt]
        return p.context_columns if self.grids[grid].context else p.columns

    def width(self, grid: str) -> int:
        """The most columns any prompt has in `grid`."""
        return max(len(self.columns(grid, i)) for i in range(len(self.prompts)))

    def unit_locations(self, chunk: Chunk, table: dict | None = None) -> dict:
        """pyvene ``unit_locations`` for `chunk`: ``{"base": [per node: [per row: positions]]}``; `table`:
        `restoring(chunk)`, if the caller has it."""
        table = restoring(chunk) if table is None else table
        positions = _cell_positions(chunk)
        return {"base": [self._node_locations(chunk, node, table, positions) for node in self.nodes[chunk.graph]]}

    def subspaces(self, chunk: Chunk, table: dict | None = None) -> list:
        """Per node, per row: the row's units where its cell restores this node (``[0]``, or its features),
        ``[]`` elsewhere; `table` as for `unit_locations`."""
        out, table = [], restoring(chunk) if table is None else table
        for site, layer in self.nodes[chunk.graph]:
            if site == "noise":
                out.append(None)
                continue
            on = table.get((site, layer), ())
            out.append([list(r.cell.units) if b in on else [] for b, r in enumerate(chunk.rows)])
        return out

    def noised(self, chunk: Chunk, row: Row) -> list[int]:
        """Subject positions of `row` that `chunk` computes (absolute positions)."""
        return [p for p in self.prompts[row.prompt].base.subject if p >= chunk.prefix]

    def _node_locations(self, chunk: Chunk, node, table: dict, rows: list[list[int]]) -> list[list[int]]:
        site, layer = node
        shift = chunk.prefix
        if site == "noise":
            # a row whose subject lies wholly in the cached prefix gets zero noise at position 0
            k = max(1, max(len(self.noised(chunk, r)) for r in chunk.rows))
            return [_pad([p - shift for p in self.noised(chunk, r)] or [0], k) for r in chunk.rows]
        on, idle = table.get((site, layer), ()), [0] * len(rows[0])
        return [positions if b in on else idle for b, positions in enumerate(rows)]


def restoring(chunk: Chunk) -> dict[tuple[str, int | None], set[int]]:
    """``(site, layer) -> the rows of `chunk` that restore it`` (``layer`` None: any layer)."""
    table: dict = {}
    for b, r in enumerate(chunk.rows):
        if r.cell is not None:
            table.setdefault((r.cell.site, None), set()).add(b)
            for layer in r.cell.layers:
                table.setdefault((r.cell.site, layer), set()).add(b)
    return table


def _cell_positions(chunk: Chunk) -> list[list[int]]:
    """Each row's restored positions, counted from the chunk's prefix, padded to its widest row (`_pad`)."""
    k = max((len(r.cell.positions) for r in chunk.rows if r.cell), default=1)
    return [_pad([p - chunk.prefix for p in r.cell.positions], k) if r.cell else [0] * k for r in chunk.rows]


def _pad(positions, k: int) -> list[int]:
    """Pad to `k` units by repeating the first; restoring a position twice is idempotent."""
    positions = list(positions)
    return positions + [positions[0]] * (k - len(positions))


def resolve_layers(spec, num_layers: int, field: str = "layers") -> tuple[int, ...]:
    """The spec's layer list `field` (``all`` or indices, negative from the end) as sorted indices."""
    chosen = getattr(spec, field)
    if chosen == "all":
        return tuple(range(num_layers))
    out = []
    for i, layer in enumerate(chosen):
        if not -num_layers <= layer < num_layers:
            raise SpecError(f"{field}[{i}]", layer, f"a layer in [-{num_layers}, {num_layers - 1}] "
                                                    f"(the model has {num_layers} layers)")
        out.append(layer % num_layers)
    return tuple(sorted(set(out)))


def language_prompts(spec, model, tokenizer, processor=None) -> list[Prompt]:
    """The engine's prompts for a language-model trace or patch spec: tokenized, aligned, subjects found."""
    return _trace_prompts(spec, tokenizer) if is_trace(spec) else _patch_prompts(spec, tokenizer)


language_prompts.modality = "language"


def compile_spec(spec, model: torch.nn.Module, tokenizer, *, prepare=language_prompts, processor=None,
                 max_batch_rows: int | None = None, share_prefix: bool = True, skip_layers: bool = True,
                 memory: int | None = None, units: tuple[UnitAxis, ...] = ()) -> Plan:
    """Compile a trace or patch spec for `model` into a `Plan`. Raises `SpecError` for inputs the model
    cannot take.

    `prepare(spec, model, tokenizer, processor)` turns the spec's prompts into the engine's `Prompt`s;
    it names the modality it prepares in its `modality` attribute. The front door
    (`interventions.api.compile_spec`) picks it for `spec.modality`; the engine itself knows none.

    `share_prefix=False` recomputes every row from position 0, and `skip_layers=False`
    from layer 0 (same results, slower). `memory` (bytes) bounds what the run allocates
    beyond the weights: 35% for the states of the prompts in flight, 35% for one forward
    pass, the rest headroom. Chunks hold at most `max_batch_rows` rows either way.
    `processor`: a VLM's image processor, for image files (None: raw pixels in [0, 1]).
    `units`: feature grids beside the spec's site grids (the front door builds them from `spec.features`).
    """
    if getattr(prepare, "modality", None) != spec.modality:
        raise TypeError(f"compile_spec: the preparer {getattr(prepare, '__name__', prepare)!r} is not for "
                        f"`modality: {spec.modality}`; call interventions.compile_spec, which picks it")
    table = site_table(model)
    share_prefix = share_prefix and table.causal      # a bidirectional encoder's positions all see each other
    prompts = prepare(spec, model, tokenizer, processor)
    grid_sites = site_grids(spec)
    for site in grid_sites.values():
        table.component(site, 0)   # unknown site for this family -> SpecError
    grids, cells = _grid_cells(spec, table, model, prompts, grid_sites)
    unit_grids, unit_cells = _unit_cells(spec, table, prompts, units)
    grids, cells = {**grids, **unit_grids}, {**cells, **unit_cells}
    noise, sigma, variants = _noise(spec, model, table, prompts)
    nodes, graphs, collect_nodes, collect_graph = _graphs(model, table, grid_sites, cells, prompts, noise is not None,
                                                          units)
    grid_sites = {**grid_sites, **{u.name: u.name for u in units}}     # grid -> its graph's key
    diverge = [first_difference(p, noise is not None) if table.causal else 0 for p in prompts]
    # before the runs diverge a restore copies what is there already; a feature edit (zero, clamp, add) still acts
    same = {name for name in cells} - {u.name for u in units if u.edit != "restore"}
    noop = [c for name in same for c in cells[name] if max(c.positions) < diverge[c.prompt]]
    cells = {name: [c for c in cells[name] if name not in same or max(c.positions) >= diverge[c.prompt]]
             for name in cells}
    sizer = _Sizer(max_batch_rows or spec.max_batch_rows, Costs.of(model), memory,
                   {site: len(n) for site, n in nodes.items()}, len(collect_nodes), variants, skip_layers)
    blocks = sizer.blocks(prompts)
    chunks = _all_chunks(blocks, grid_sites, cells, graphs, prompts, sizer, variants, share_prefix, skip_layers)
    return Plan(spec, model, tokenizer, table, prompts, grids, graphs, nodes, collect_graph, collect_nodes,
                chunks, variants, noise, sigma, shares_prefix=any(c.prefix for c in chunks),
                skips_layers=any(c.start for c in chunks), noop_cells=noop, blocks=blocks,
                clean_rows=sizer.clean_rows(prompts), memory=memory,
                layer_modules=list(get_module(model, table.layers)))


#: Grids that restore one layer's output alone, whatever the spec's `window`.
SINGLE_LAYER_GRIDS = ("hidden", "vision_hidden")


def layers_field(table: SiteTable, site: str) -> str:
    """The spec field that picks `site`'s layers: `vision_layers` for an image tower read beside a language
    model's context (`SiteTable.context_sites`), else `layers`."""
    return "vision_layers" if table.context_layers is not None and not table.in_context(site) else "layers"


def _grid_cells(spec, table: SiteTable, model, prompts: list[Prompt], grid_sites: dict):
    """Each grid's axes, and its cells: one per (prompt, layer, column), restoring a window of layers."""
    grids, cells = {}, {}
    for name, site in grid_sites.items():
        layered, context = table.is_layered(site), table.in_context(site)
        num_layers = table.num_layers(model, site)
        size = 1 if (name in SINGLE_LAYER_GRIDS or not layered) else spec.window
        axis = resolve_layers(spec, num_layers, layers_field(table, site)) if layered else (0,)
        grids[name] = GridAxes(name, site, axis, "prob" if is_trace(spec) else spec.metric, context=context)
        restores = {layer: window(layer, size, num_layers) if layered else () for layer in axis}
        cells[name] = [Cell(name, site, pi, li, ci, restores[layer], cols[1],
                            first_layer=_first(table, site, restores[layer]))
                       for pi, p in enumerate(prompts) for li, layer in enumerate(axis)
                       for ci, cols in enumerate(p.context_columns if context else p.columns)]
    return grids, cells


def _first(table: SiteTable, site: str, layers: tuple[int, ...]) -> int:
    """The first layer of the prompt's sequence whose computation a restore of `site` at `layers` can change:
    layers before it are the baseline's. A layer's output restored at one position is the baseline's elsewhere,
    so that layer need not be computed either. A site outside the layers, or in the context, changes layer 0 on."""
    if not layers or table.in_context(site):
        return 0
    return min(layers) + table.is_layer_output(site)


def _unit_cells(spec, table: SiteTable, prompts: list[Prompt], units: tuple[UnitAxis, ...]):
    """Each feature grid's axes, and its cells: one per (prompt, unit, column), at the grid's one layer."""
    grids, cells = {}, {}
    for u in units:
        grids[u.name] = GridAxes(u.name, u.site, u.units, "prob" if is_trace(spec) else spec.metric, "feature", u.layer)
        cells[u.name] = [Cell(u.name, u.site, pi, ui, ci, (u.layer,), cols[1], row, _first(table, u.site, (u.layer,)))
                         for pi, p in enumerate(prompts) for ui, row in enumerate(u.rows())
                         for ci, cols in enumerate(p.columns)]
    return grids, cells


def _noise(spec, model, table: SiteTable, prompts: list[Prompt]):
    """A noise trace's seeded noise per prompt, its sigma and its number of draws; `(None, None, 1)` otherwise."""
    if not (is_trace(spec) and spec.corruption in ("noise", "text", "patch_noise")):
        return None, None, 1
    sigma = spec.sigma if spec.sigma is not None else subject_sigma(model, table, prompts)
    return [draw_noise(spec, p, sigma, _embed_dim(model, table, prompts)) for p in prompts], sigma, spec.samples


def _graphs(model, table: SiteTable, grid_sites: dict, cells: dict, prompts: list[Prompt], noised: bool,
            units: tuple[UnitAxis, ...] = ()):
    """Per site (a feature grid: per grid name), the nodes its rows restore (plus the noise node) and their
    pyvene graph; and the graph that collects every needed clean state in one pass."""
    # prompts run as embeddings (a VLM's image features merged in, an image's patches) have no embedding
    # lookup to corrupt: their noise is added where the embeddings enter, which is the same tensor
    noise_at = (EMBED, None) if prompts[0].source.embeds is None else table.noise_at
    noise = [("noise", None)] if noised else []
    nodes, graphs = {}, {}
    for name, site in grid_sites.items():
        used = sorted({layer for c in cells[name] for layer in c.layers}) if table.is_layered(site) else [None]
        nodes[site] = noise + [(site, layer) for layer in used]
        graphs[site] = build_graph(model, [_node(table, n, noise_at) for n in nodes[site]])
    for u in units:
        nodes[u.name] = noise + [(u.site, u.layer)]
        graphs[u.name] = build_graph(model, [_node(table, n, noise_at, u) for n in nodes[u.name]])
    collect_nodes = list(dict.fromkeys(n for key in nodes for n in nodes[key] if n[0] != "noise"))
    collect_graph = build_graph(model, [(table.component(s, l), CollectStates()) for s, l in collect_nodes])
    return nodes, graphs, collect_nodes, collect_graph


def _all_chunks(blocks, grid_sites: dict, cells: dict, graphs: dict, prompts: list[Prompt], sizer: "_Sizer",
                variants: int, share_prefix: bool, skip_layers: bool) -> list[Chunk]:
    chunks = []
    for b, block in enumerate(blocks):
        # Baseline rows (no restore) first: they give the key/value caches, and patch
        # metrics need the base run's top-1.
        baseline = [Row(pi, v) for pi in block for v in range(variants)]
        chunks += _pack(next(iter(graphs)), baseline, prompts, 0, sizer, b, skip_layers=False)
        for name, site in grid_sites.items():
            rows = [Row(c.prompt, v, c) for c in cells[name] if c.prompt in block for v in range(variants)]
            chunks += _chunk(site, rows, prompts, sizer, share_prefix, skip_layers, b)
    return chunks


def site_grids(spec) -> dict[str, str]:
    """Grid name -> site for a spec's `sites` (a trace names kinds: hidden, mlp, attention) and its `vision_sites`
    (the image tower's, named ``vision_<name>``)."""
    def named(names, prefix=""):
        return {prefix + n: prefix + (TRACE_SITES[n] if is_trace(spec) else n) for n in names}
    return {**named(getattr(spec, "vision_sites", ()), "vision_"), **named(spec.sites)}     # in the order data flows


def is_trace(spec) -> bool:
    return spec.kind == "trace"


def first_difference(prompt: Prompt, noised: bool) -> int:
    """The first position where the base run's input differs from the source run's.

    Before it the two runs compute identical states (causal attention), so restoring
    a source state there changes nothing and the cell equals the baseline run.
    """
    if noised:
        return min(prompt.base.subject)
    base, source = prompt.base, prompt.source
    if base.embeds is not None:
        same = (base.embeds == source.embeds).all(-1).tolist()
    else:
        same = [a == b for a, b in zip(base.ids, source.ids)]
    return same.index(False) if False in same else len(same)


def _node(table: SiteTable, node, noise_at: tuple[str, int | None], axis: UnitAxis | None = None):
    site, layer = node
    if site == "noise":
        return table.component(*noise_at), AddIntervention()
    if axis is None:
        return table.component(site, layer), RestoreIntervention()
    return table.component(site, layer), UnitRestore(axis.basis, axis.edit, axis.value)


#: Without a memory budget: the baseline states held at once; prompts run in blocks under it.
CACHE_BUDGET_BYTES = 512 * 2**20
#: Under a budget: the shares for the states of the prompts in flight and for one forward pass.
#: The rest is headroom for the allocator's slack and the interpreter, as measured in the tests.
STATES_SHARE, FORWARD_SHARE = 0.35, 0.35


class _Sizer:
    """Sizes prompt blocks and chunks: by `max_batch_rows` full-length rows' worth of tokens,
    or, under a `memory` budget, by the bytes `Costs` estimates (and at most `max_batch_rows` rows)."""

    def __init__(self, size: int, costs: Costs, memory: int | None, nodes: dict[str, int], collected: int,
                 variants: int, skip_layers: bool):
        self.size, self.costs, self.memory, self.nodes = size, costs, memory, nodes
        self.collected, self.variants, self.skip_layers = collected, variants, skip_layers
        self.states = int(memory * STATES_SHARE) if memory else CACHE_BUDGET_BYTES
        self.forward = int(memory * FORWARD_SHARE) if memory else None

    def blocks(self, prompts: list[Prompt]) -> list[list[int]]:
        """Consecutive prompts whose states fit the states budget together."""
        blocks, current, used = [], [], 0
        for i, p in enumerate(prompts):
            need = self.costs.prompt_state(len(p.base), self.collected, self.variants, self.skip_layers)
            if self.memory and need > self.states:
                raise SpecError("memory", human(self.memory),
                                f"at least {human(need / STATES_SHARE)}: prompt {i} alone holds {human(need)} of states "
                                f"(clean states at {self.collected} sites, {self.variants} baseline cache(s)); "
                                "or fewer layers, sites or samples")
            if current and used + need > self.states:
                blocks.append(current)
                current, used = [], 0
            current.append(i)
            used += need
        return blocks + [current]

    def fits(self, rows: int, graph: str, new: int, context: int, units: int, skipped: int, full: int) -> bool:
        """Whether `rows` rows computing `new` of `context` tokens fit one forward pass.

        `full` is the group's longest prompt, the unit of the budget without `memory`.
        Raises when a single row cannot fit the memory budget.
        """
        if self.memory is None:
            return rows * new <= self.size * full
        cost = self.costs.row(new, context, self.nodes.get(graph, 0), units, skipped)
        if cost > self.forward:
            raise SpecError("memory", human(self.memory),
                            f"at least {human(cost / FORWARD_SHARE)}: one forward row of {context} tokens needs about "
                            f"{human(cost)}")
        return rows <= self.size and rows * cost <= self.forward

    def clean_rows(self, prompts: list[Prompt]) -> int:
        """Prompts per clean pass (every position, states collected at every node)."""
        if self.memory is None:
            return self.size
        n = max(len(p.source) for p in prompts)
        rows = 1
        while rows < min(self.size, len(prompts)) and self.fits(rows + 1, "", n, n, 0, 0, n):
            rows += 1
        return rows


def _first_layer(row: Row) -> int:
    return row.cell.first_layer


def _units(row: Row) -> int:
    return len(row.cell.positions) if row.cell else 1


def _chunk(graph: str, rows: list[Row], prompts: list[Prompt], sizer: _Sizer, share_prefix: bool,
           skip_layers: bool, block: int) -> list[Chunk]:
    """Group rows by shared prefix, then pack each group into chunks.

    A row computes ``len(prompt) - prefix`` tokens, so short continuations pack more rows
    into one pass at the same activation memory. Rows are sorted by their first restored
    layer, so that a chunk starts late; among equals, rows of similar length go together.
    """
    groups: dict[int, list[Row]] = {}
    for r in rows:
        groups.setdefault(min(r.cell.positions) if share_prefix else 0, []).append(r)
    chunks = []
    for prefix, group in sorted(groups.items()):
        group.sort(key=lambda r: (-_first_layer(r) if skip_layers else 0, len(prompts[r.prompt].base)))
        chunks += _pack(graph, group, prompts, prefix, sizer, block, skip_layers)
    return chunks


def _pack(graph: str, rows: list[Row], prompts: list[Prompt], prefix: int, sizer: _Sizer, block: int,
          skip_layers: bool) -> list[Chunk]:
    """Fill chunks with `rows` in order, as many rows as `sizer` lets one forward pass hold."""
    if not rows:
        return []
    full = max(len(prompts[r.prompt].base) for r in rows)
    skipped = _first_layer(rows[0]) if skip_layers else 0     # rows come latest first: an upper bound
    chunks, current, length, units = [], [], 0, 1
    for r in rows:
        n, k = len(prompts[r.prompt].base), _units(r)
        if current:
            n, k = max(n, length), max(k, units)
            if not sizer.fits(len(current) + 1, graph, n - prefix, n, k, skipped, full):
                chunks.append(_make_chunk(graph, current, prefix, skip_layers, block))
                current, n, k = [], len(prompts[r.prompt].base), _units(r)
        if not current:
            sizer.fits(1, graph, n - prefix, n, k, skipped, full)      # raises if one row cannot fit
        current.append(r)
        length, units = n, k
    chunks.append(_make_chunk(graph, current, prefix, skip_layers, block))
    return chunks


def _make_chunk(graph: str, rows: list[Row], prefix: int, skip_layers: bool, block: int) -> Chunk:
    return Chunk(graph, rows, prefix, min(_first_layer(r) for r in rows) if skip_layers else 0, block)


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


def _embed_dim(model, table: SiteTable, prompts: list[Prompt]) -> int:
    embeds = prompts[0].source.embeds
    return embeds.shape[-1] if embeds is not None else table.module(model, EMBED).weight.shape[1]


@torch.no_grad()
def subject_sigma(model, table: SiteTable, prompts: list[Prompt]) -> float:
    """The std of the subject tokens' input embeddings over all prompts (ROME's noise unit). A VLM's
    subject is its image tokens (their projected features) or the constraint's words."""
    embed = table.module(model, EMBED)
    vecs = [(p.source.embeds if p.source.embeds is not None else
             embed(torch.tensor([p.source.ids], device=embed.weight.device))[0])[list(p.source.subject)].cpu()
            for p in prompts]
    return float(torch.cat(vecs).float().std())


def draw_noise(spec, prompt: Prompt, sigma: float, dim: int) -> torch.Tensor:
    """(samples, n_subject, d) Gaussian noise times ``noise * sigma``, reproducible from `seed`
    and the prompt's identity."""
    gen = noise_generator(spec.seed, *prompt.identity)
    z = torch.randn(spec.samples, len(prompt.source.subject), dim, generator=gen)
    return z * (spec.noise * sigma)
