"""Lenses: read what each layer's residual state predicts, through the model's own unembedding.

- **Logit lens** (nostalgebraist 2020): the state after block ``l`` goes through the final norm and
  the unembedding (`SiteTable.readout`). At the last block it is the model's own output.
- **Tuned lens** (Belrose et al. 2023): first an affine translator per layer,
  ``h + (h A) B + b``, trained to make the lens's next-token distribution match the model's
  final one (KL), on text the model itself wrote (see `train_tuned_lens` for the recipe).
  A translator of rank ``r`` is stored as A ``(d, r)``, B ``(r, d)`` and b; ``rank=None`` is a
  full ``d x d`` matrix.

Both run on language models and VLMs (image tokens are positions like any other). The states
are collected by a pyvene graph (`CollectStates` at every layer's block output), in batches of
right-padded prompts, so a prompt's grid does not depend on its batch or padding.

>>> spec = parse_spec({"kind": "lens", "prompts": [{"prompt": "The Eiffel Tower is in the city of",
...                                                  "target": " Paris"}]})      # doctest: +SKIP
>>> result = run_lens(spec, model, tokenizer)                                     # doctest: +SKIP
>>> result.grids["logit_lens"].values[0, :, -1]      # p(" Paris") at the last token, per layer  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from interventions.core.atomic import atomic_save_file
from interventions.core.conventions import answer_id
from interventions.core.errors import SpecError, short
from interventions.core.prompts import Encoded, encode, model_inputs, pad_token_id
from interventions.core.prompts import columns as position_columns
from interventions.core.reading import read_safetensors
from interventions.core.tagged import broken_seal, seal
from interventions.engine.plan import resolve_layers
from interventions.engine.pv import CollectStates, build_graph
from interventions.engine.result import Grid, Result
from interventions.models.sites import layers_through, site_table


@dataclass
class Reading:
    """A prompt ready to read: its tokens (and merged embeddings for a VLM), its named position sets
    (``subject``, ``image``, ``constraint``), its target and what its result record says."""

    enc: Encoded
    groups: dict[str, tuple[int, ...]] = field(default_factory=dict)
    target: str | None = None
    target_id: int | None = None
    record: dict = field(default_factory=dict)
    answer: int | None = None        # the position whose reading is the model's answer (default: the last)


def prepare(model, tokenizer, text: str, *, field: str, processor=None, image: str | None = None,
            subject: str | None = None, constraint: str | None = None, vision: bool = False) -> Reading:
    """One prompt tokenized as the engine tokenizes it: a language model's prompt with `subject`
    located, or a VLM's ``[lead] <image>xn text`` with its image and `constraint` positions."""
    if not vision:
        enc = encode(tokenizer, text, subject=subject, field=field)
        return Reading(enc, {"subject": enc.subject} if subject else {})
    from interventions.modalities.vision_language.llava import (
        constraint_positions,
        encode_with_image,
        image_positions,
        load_image,
    )

    pixels = None if image is None else load_image(image, model, processor, field=f"{field}.image")
    enc = encode_with_image(model, tokenizer, text, pixels, field=field, subject=constraint if pixels is None else None)
    groups = {}
    if image is not None:
        groups["image"] = tuple(image_positions(list(enc.ids), model))
    if constraint is not None:
        groups["constraint"] = constraint_positions(tokenizer, model, enc, text, constraint, pixels,
                                                    f"{field}.constraint")
    return Reading(enc, groups)


def image_readings(spec, model, tokenizer, processor=None) -> list[Reading]:
    """The images of a contrastive lens spec: patch sequences (`ZeroShot`), targets as class indices."""
    from interventions.modalities.contrastive.inputs import class_index, image_sequence

    out = []
    for i, p in enumerate(spec.prompts):
        enc, _ = image_sequence(model, p.image, processor, field=f"prompts[{i}].image")
        out.append(Reading(enc, {"patches": enc.subject}, p.target,
                           class_index(tokenizer, p.target, f"prompts[{i}].target"),
                           {"prompt": p.image, "image": p.image}, answer=0))        # CLS is what the model reads
    return out


def readings(spec, model, tokenizer, processor=None) -> list[Reading]:
    """The prompts of a lens or knockout spec, with their targets resolved where given."""
    if spec.modality == "contrastive":
        return image_readings(spec, model, tokenizer, processor)
    vision = spec.modality == "vision-language"
    out = []
    for i, p in enumerate(spec.prompts):
        where = f"prompts[{i}]"
        r = prepare(model, tokenizer, p.prompt, field=where, processor=processor, vision=vision,
                    image=getattr(p, "image", None), subject=getattr(p, "subject", None),
                    constraint=getattr(p, "constraint", None))
        r.target = p.target
        if p.target is not None:
            r.target_id = answer_id(tokenizer, p.target, field=f"{where}.target")
        r.record = {"prompt": p.prompt, **({"image": p.image} if vision else {}),
                    **{f"{k}_positions": list(v) for k, v in r.groups.items()}}
        out.append(r)
    return out


@torch.no_grad()
def collect_states(model, tokenizer, encs: list[Encoded], layers: list[int], *, site: str = "block_output",
                   max_rows: int = 48, logits: bool = True) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Every position's state at `site` of each layer, through a pyvene graph of `CollectStates` nodes:
    ``[Float[Tensor, "layer len d"]]`` per prompt (float32, on the CPU), and the model's own
    ``Float[Tensor, "prompt vocab"]`` logits at each prompt's last position; with `logits` False, none,
    and the layers after the deepest collected one are not computed (`models.sites.layers_through`)."""
    from contextlib import nullcontext

    from interventions.core.runtime import eval_mode, input_device, keeps_logits

    table = site_table(model)
    graph = build_graph(model, [(table.component(site, layer), CollectStates()) for layer in layers])
    device = input_device(model)
    states, last_logits = [], []
    with eval_mode(model), (nullcontext() if logits else layers_through(model, table, max(layers))):
        for lo in range(0, len(encs), max_rows):
            batch = encs[lo:lo + max_rows]
            inputs = model_inputs(batch, pad_token_id(tokenizer), device)
            width = inputs["attention_mask"].shape[1]
            every = [list(range(width))] * len(batch)
            keep = {} if logits or not keeps_logits(model) else {"logits_to_keep": 1}     # no head over every position
            (_, collected), out = graph(base={**inputs, "use_cache": False, **keep},
                                        unit_locations={"base": [every] * len(layers)})
            stacked = torch.stack([c.float().cpu() for c in collected], dim=1)     # (batch, layer, width, d)
            for b, enc in enumerate(batch):
                states.append(stacked[b, :, :len(enc)])
                if logits:
                    last_logits.append(out.logits[b, len(enc) - 1].float().cpu())
    return states, torch.stack(last_logits) if logits else None


# --------------------------------------------------------------------------- tuned lens
class Translator(nn.Module):
    """``h -> h + (h A) B + b`` (rank r), or ``h + h W + b`` (full); zero at initialisation (the logit lens)."""

    def __init__(self, d: int, rank: int | None, generator: torch.Generator | None = None):
        super().__init__()
        self.rank = rank
        if rank is None:
            self.weight = nn.Parameter(torch.zeros(d, d))
        else:
            self.A = nn.Parameter(torch.randn(d, rank, generator=generator) / d ** 0.5)
            self.B = nn.Parameter(torch.zeros(rank, d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        change = h @ self.weight if self.rank is None else (h @ self.A) @ self.B
        return h + change + self.bias


class TunedLens(nn.Module):
    """One `Translator` per layer (the last layer's is the identity: its logit lens is already exact)."""

    def __init__(self, d: int, layers: list[int], rank: int | None = 64, meta: dict | None = None, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = list(layers)
        self.translators = nn.ModuleDict({str(layer): Translator(d, rank, g) for layer in layers})
        self.rank, self.d = rank, d
        self.meta = dict(meta or {})

    def forward(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        t = self.translators[str(layer)] if str(layer) in self.translators else None
        return h if t is None else t(h)

    def save(self, path: str | Path) -> Path:
        """Written in float16 (half the size; a lens needs no more precision), read back as float32."""
        meta = {"format": "lesion-tuned-lens", "d": str(self.d), "rank": str(self.rank or "full"),
                "layers": json.dumps(self.layers), "meta": json.dumps(self.meta)}
        tensors = {k: v.detach().half().contiguous() for k, v in self.state_dict().items()}
        atomic_save_file(tensors, Path(path), seal(meta, tensors))
        return Path(path)


def load_tuned_lens(path: str | Path, model, *, field: str = "tuned") -> TunedLens:
    """A tuned lens file, sealed, whole, finite, and checked against `model` (width and layer count)."""
    meta, tensors = read_safetensors(Path(path).expanduser(), field,
                                     "a tuned lens file (written by `lesion train-lens`)")
    if meta.get("format") != "lesion-tuned-lens":
        raise SpecError(field, str(path), "a tuned lens file (its metadata says format lesion-tuned-lens)")
    broken = broken_seal(meta, tensors)
    if broken:
        raise SpecError(field, str(path), f"a tuned lens file as `lesion train-lens` wrote it; {broken}")
    config = getattr(model.config, "text_config", model.config)
    n = site_table(model).num_layers(model)
    try:
        d, layers, notes = int(meta["d"]), json.loads(meta["layers"]), json.loads(meta.get("meta", "{}"))
        rank = None if meta["rank"] == "full" else int(meta["rank"])
    except (KeyError, ValueError, TypeError, RecursionError) as err:
        raise SpecError(field, str(path), f"a tuned lens file with d, layers and rank fields ({short(str(err))})") \
            from None
    if d != config.hidden_size or not isinstance(layers, list) or not layers or not all(
            type(x) is int and 0 <= x < n for x in layers) or not (rank is None or 1 <= rank <= d):
        raise SpecError(field, str(path), f"a tuned lens for this model (width {config.hidden_size}, layers in [0, "
                        f"{n - 1}], rank in [1, width] or full); it says width {short(d)}, layers {short(layers)}, "
                        f"rank {short(rank)}")
    lens = TunedLens(d, layers, rank, notes if isinstance(notes, dict) else {})
    try:
        lens.load_state_dict({k: v.float() for k, v in tensors.items()})
    except RuntimeError as err:
        raise SpecError(field, str(path), f"a tuned lens whose tensors match its fields ({short(str(err))})") from None
    if not all(bool(torch.isfinite(t).all()) for t in lens.state_dict().values()):
        raise SpecError(field, str(path), "a tuned lens with finite translators (this one holds nan or inf)")
    return lens.eval()


def _kl(final_logp: torch.Tensor, lens_logits: torch.Tensor) -> torch.Tensor:
    """KL(final || lens) per row, in nats."""
    return (final_logp.exp() * (final_logp - lens_logits.log_softmax(-1))).sum(-1)


def train_tuned_lens(model, tokenizer, texts: list[str], *, rank: int | None = 64, steps: int = 150,
                     batch_tokens: int = 128, lr: float = 1e-3, max_tokens: int = 8192, heldout: float = 0.1,
                     seed: int = 0, log=print) -> tuple[TunedLens, dict]:
    """Belrose et al.'s objective on `texts`: for every layer but the last, minimise
    KL(model's final distribution || tuned lens) over random token batches (Adam, `steps` steps of
    `batch_tokens` tokens drawn from the first `max_tokens` tokens). A share `heldout` of the texts
    is kept out; the report gives the mean held-out KL per layer, logit lens and tuned lens."""
    table = site_table(model)
    n = table.num_layers(model)
    readout = table.readout(model)
    cut = max(1, int(len(texts) * (1 - heldout)))
    encs = [encode(tokenizer, t, field="texts") for t in texts]
    encs = [e for e in encs if len(e) > 1]
    start = time.perf_counter()
    states, _ = collect_states(model, tokenizer, encs, list(range(n)))
    train = torch.cat([s.transpose(0, 1) for s in states[:cut]])[:max_tokens]     # (tokens, layer, d)
    test = torch.cat([s.transpose(0, 1) for s in states[cut:]])[:2048]
    collect_seconds = time.perf_counter() - start
    config = getattr(model.config, "text_config", model.config)
    lens = TunedLens(config.hidden_size, list(range(n - 1)), rank, seed=seed)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(lens.parameters(), lr=lr)

    def loss_on(rows: torch.Tensor, tuned: bool) -> torch.Tensor:
        """Mean KL per layer (layer,) for token rows (tokens, layer, d)."""
        with torch.no_grad():
            final = readout(rows[:, -1]).log_softmax(-1)
        out = []
        for layer in range(n - 1):
            h = rows[:, layer]
            out.append(_kl(final, readout(lens(h, layer) if tuned else h)).mean())
        return torch.stack(out)

    try:
        t0 = time.perf_counter()
        for step in range(steps):
            idx = torch.randint(len(train), (batch_tokens,), generator=g)
            loss = loss_on(train[idx], True).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if log and (step % 25 == 0 or step == steps - 1):
                log(f"step {step}: summed KL over layers {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
        train_seconds = time.perf_counter() - t0
        with torch.no_grad():
            logit_kl = torch.stack([loss_on(test[i:i + 256], False) for i in range(0, len(test), 256)]).mean(0)
            tuned_kl = torch.stack([loss_on(test[i:i + 256], True) for i in range(0, len(test), 256)]).mean(0)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    report = {"texts": len(texts), "train_tokens": len(train), "heldout_tokens": len(test), "steps": steps,
              "batch_tokens": batch_tokens, "lr": lr, "rank": rank or "full", "seed": seed,
              "collect_seconds": round(collect_seconds, 1), "train_seconds": round(train_seconds, 1),
              "heldout_kl_logit_lens": [round(float(v), 4) for v in logit_kl],
              "heldout_kl_tuned_lens": [round(float(v), 4) for v in tuned_kl]}
    lens.meta = report
    return lens.eval(), report


# --------------------------------------------------------------------------- the lens spec
def lens_columns(spec, r: Reading, field: str = "positions") -> list[tuple[str, int]]:
    """(label, position) per column: every token, or the spec's selectors (the last token of a set)."""
    selectors = getattr(spec, "positions", ("all",))
    return [(label, pos[-1]) for label, pos in position_columns(selectors, r.enc, field)]


@torch.no_grad()
def run_lens(spec, model, tokenizer, *, processor=None, max_batch_rows: int | None = None) -> Result:
    """`kind: lens`: grids ``logit_lens`` (and ``tuned_lens``) of p(target), [prompt][layer][position],
    with ``*_rank`` grids (the target's rank, 0 = top-1) and the top-k tokens of every cell."""
    if getattr(spec, "tower", False):
        from interventions.modalities.vision_language.tower import tower_lens

        return tower_lens(spec, model, tokenizer, processor)
    table = site_table(model)
    n = table.num_layers(model)
    layers = list(resolve_layers(spec, n))
    tuned = None if getattr(spec, "tuned", None) is None else load_tuned_lens(spec.tuned, model)
    prompts = readings(spec, model, tokenizer, processor)
    cols = [lens_columns(spec, r) for r in prompts]
    states, last_logits = collect_states(model, tokenizer, [r.enc for r in prompts], layers,
                                         max_rows=max_batch_rows or spec.max_batch_rows)
    readout = table.readout(model)
    lenses = {"logit_lens": None} | ({"tuned_lens": tuned} if tuned is not None else {})
    width = max(len(c) for c in cols)
    grids = {}
    for name in lenses:
        grids[name] = torch.full((len(prompts), len(layers), width), float("nan"))
        grids[f"{name}_rank"] = torch.full((len(prompts), len(layers), width), float("nan"))
    records = []
    for i, (r, c) in enumerate(zip(prompts, cols)):
        final = last_logits[i].log_softmax(-1)
        target_id = r.target_id if r.target_id is not None else int(final.argmax())
        record = {**r.record, "target": r.target if r.target is not None else tokenizer.decode([target_id]),
                  "target_id": target_id, "answer": tokenizer.decode([int(final.argmax())]),
                  "clean_prob": float(final[target_id].exp()), "columns": [label for label, _ in c],
                  "positions": [pos for _, pos in c]}
        h = states[i][:, [pos for _, pos in c]]                       # (layer, column, d)
        for name, lens in lenses.items():
            rows = torch.stack([h[k] if lens is None else lens(h[k], layer) for k, layer in enumerate(layers)])
            logp = readout(rows).float().log_softmax(-1)               # (layer, column, vocab)
            target = logp[..., target_id]
            grids[name][i, :, :len(c)] = target.exp()
            rank = (logp > target[..., None]).sum(-1).float()
            grids[f"{name}_rank"][i, :, :len(c)] = rank
            top = logp.topk(min(spec.top_k, logp.shape[-1]), dim=-1)     # a classifier may have fewer classes
            record[f"{name}_top_k"] = [[[[tokenizer.decode([int(t)]), round(float(p.exp()), 4)]
                                         for t, p in zip(ids, vals)] for ids, vals in zip(li, lv)]
                                       for li, lv in zip(top.indices, top.values)]
            answer = len(r.enc) - 1 if r.answer is None else r.answer
            column = next((k for k, (_, pos) in enumerate(c) if pos == answer), None)
            last = rank[:, column] if column is not None else None
            if last is not None:
                top1 = (last == 0).tolist()
                record[f"{name}_first_top1_layer"] = next((layers[k] for k, t in enumerate(top1) if t), None)
                settled = next((k for k in range(len(top1)) if all(top1[k:])), None)
                record[f"{name}_settled_layer"] = None if settled is None else layers[settled]
        records.append(record)
    lengths = [len(c) for c in cols]
    out = {name: Grid(name, "block_output", "rank" if name.endswith("_rank") else "prob", layers, values, lengths)
           for name, values in grids.items()}
    meta = {"layers": layers, "top_k": spec.top_k}
    if tuned is not None:
        meta["tuned_lens"] = {"file": spec.tuned, "rank": tuned.rank or "full",
                              **{k: v for k, v in tuned.meta.items() if not k.startswith("heldout_kl")}}
    return Result("lens", spec.model, spec, records, out, meta)
