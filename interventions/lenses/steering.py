"""Steering vectors: estimate from contrastive prompts, save, and add during generation.

Estimation reads one site (the residual stream, `block_output`, by default) at each of the
spec's layers, at each prompt's last token (`read: last`) or averaged over its tokens
(`read: mean`):

- `mean_diff` (ActAdd, Turner et al. 2023; CAA, Rimsky et al. 2024): mean(positive) − mean(negative).
- `feature` (AxBench's SAE baseline, Wu et al. 2025): one feature of a dictionary at the layer, its
  decoder row times the difference of its mean activation on the positive and the negative read
  states (the feature with the largest difference unless the spec names one): the part of the mean
  difference that one feature carries, so a coefficient means the same as for `mean_diff`.
- `pca` (representation engineering, Zou et al. 2023): the first principal direction of the paired
  differences d_i = positive_i − negative_i. RepE takes differences of randomly ordered pairs, so
  their mean is ~0 and the first component of their covariance is the top right singular vector
  of the *uncentred* differences; we use that directly. The sign is chosen so that the
  differences project positively, and the vector is scaled to their mean projection, so a
  coefficient means the same for both methods.

Addition goes through a pyvene graph with Lesion's `AddIntervention` at each layer, in our
own KV-cached decoding loop. Every row adds ``coef_row × mask[row, position] × v``: the mask
selects the prompt, the generated tokens, or both (`apply_to`), and rows may carry different
coefficients, so a whole coefficient sweep is one batched generation. A zero coefficient adds
exact zeros, so it reproduces the unsteered model bit for bit.

>>> vector = estimate(model, tokenizer, pos, neg, layers=[10], model_name="smollm2-135m")    # doctest: +SKIP
>>> vector.save("runs/steer/vector.safetensors")                                            # doctest: +SKIP
>>> with steering(model, tokenizer, vector, coef=4.0) as steer:                             # doctest: +SKIP
...     print(steer.generate(["I went to the"], max_new_tokens=20))
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache

from interventions.core.atomic import atomic_save_file
from interventions.core.errors import LesionError, short
from interventions.core.metrics import continuation_logprob
from interventions.core.prompts import pad_token_id, right_pad
from interventions.core.tagged import broken_seal, read_tagged, seal
from interventions.engine.pv import AddIntervention, CollectStates, build_graph
from interventions.models.sites import site_table
from interventions.spec import APPLY_TO, STEER_SITES

log = logging.getLogger(__name__)

META_KEY = "lesion_steer"
FORMAT_VERSION = 2           # 2: sealed with content and integrity hashes (1 had none)


class SteerError(LesionError, ValueError):
    """A steering vector file that cannot be used with this model."""


def prompts_sha256(positive: list[str], negative: list[str]) -> str:
    return hashlib.sha256(json.dumps([positive, negative]).encode()).hexdigest()


@dataclass
class SteeringVector:
    """One vector per layer (``Float[Tensor, "d"]``), added at `site` of that layer."""

    vectors: dict[int, torch.Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def site(self) -> str:
        return self.meta["site"]

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    def save(self, path: str | Path) -> Path:
        """Write atomically: a temporary file in the same folder, then a rename."""
        tensors = {f"layer.{l}": v.detach().float().contiguous().cpu() for l, v in self.vectors.items()}
        meta = seal({**self.meta, "format_version": FORMAT_VERSION}, tensors)
        return atomic_save_file(tensors, path, {META_KEY: json.dumps(meta, sort_keys=True)})


def load_vector(path: str | Path) -> SteeringVector:
    """Read a vector file, refusing anything that is not one (with the reason)."""
    shown = short(str(path))
    meta, tensors = read_tagged(path, META_KEY, SteerError, "steer", "vector file written by `kind: steer`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SteerError(f"`steer`: {shown} has format_version {short(meta.get('format_version'))}; "
                         f"this Lesion reads {FORMAT_VERSION} (version 1 carries no integrity hash: run the steer "
                         "spec again)")
    broken = broken_seal(meta, tensors)
    if broken:
        raise SteerError(f"`steer`: {shown}: {broken}")
    if not isinstance(meta.get("site"), str) or not isinstance(meta.get("layers"), list):
        raise SteerError(f"`steer`: {shown}: its metadata must name the `site` and the `layers` (a list)")
    vectors = {}
    for key, value in tensors.items():
        layer = key.removeprefix("layer.")
        if not key.startswith("layer.") or not (layer.isascii() and layer.isdigit()) or value.dim() != 1:
            raise SteerError(f"`steer`: {shown} holds {short(key)} of shape {list(value.shape)}; expected "
                             "1-d tensors named layer.N")
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise SteerError(f"`steer`: {shown}: {short(key)} is not a finite floating-point vector")
        vectors[int(layer)] = value
    if sorted(vectors) != meta.get("layers"):
        raise SteerError(f"`steer`: {shown} holds layers {sorted(vectors)} but its metadata says "
                         f"{short(meta.get('layers'))}")
    return SteeringVector(vectors, {k: v for k, v in meta.items() if k not in ("content_sha256", "integrity_sha256")})


#: The largest value ``coef × v`` may add to a hidden state (or the model dtype's largest / 16, when
#: smaller): hidden states of real language models are at most in the thousands, and a change past
#: this overflows the norms that follow (their squares), turning every logit into nan.
MAX_ADDED = 1e6


def check_vector(model, vector: SteeringVector, coefficients: tuple[float, ...] = (1.0,)) -> None:
    """Refuse a vector whose site, layers or width do not fit `model`, or that the largest of
    `coefficients` scales past what the hidden states can hold (`MAX_ADDED`)."""
    table = site_table(model)
    n = table.num_layers(model)
    if not vector.vectors:
        raise SteerError("`steer`: the vector file holds no layers; expected at least one `layer.N` vector")
    if vector.site not in STEER_SITES:
        raise SteerError(f"`steer`: site {vector.site!r} is not one of {list(STEER_SITES)}")
    bad = [l for l in vector.layers if l >= n]
    if bad:
        raise SteerError(f"`steer`: layers {bad} do not exist in this model ({n} layers); the vector was made "
                         f"for {vector.meta.get('model')!r}")
    width = model.config.get_text_config(decoder=True).hidden_size
    for layer, v in vector.vectors.items():
        if v.shape[0] != width:
            raise SteerError(f"`steer`: layer {layer}'s vector has {v.shape[0]} dims but this model's hidden size "
                             f"is {width}; the vector was made for {vector.meta.get('model')!r}")
    limit = min(MAX_ADDED, torch.finfo(next(model.parameters()).dtype).max / 16)
    added = max(abs(c) for c in coefficients) * max(float(v.abs().max()) for v in vector.vectors.values())
    if added > limit:
        raise SteerError(f"`coef`: {max(coefficients, key=abs)!r} times the vector's largest value adds "
                         f"{added:.3g} to a hidden state; expected at most {limit:.3g} (a smaller coefficient, or "
                         "a vector from `kind: steer`)")


@torch.inference_mode()
def read_states(model, tokenizer, texts: list[str], layers: list[int], site: str, read: str,
                batch: int = 32) -> torch.Tensor:
    """``Float[Tensor, "layer text d"]``: `site` at each layer, at each text's last token or its mean."""
    table = site_table(model)
    graph = build_graph(model, [(table.component(site, l), CollectStates()) for l in layers])
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch):
        ids = [tokenizer(t)["input_ids"] for t in texts[start:start + batch]]
        inputs = right_pad(ids, pad_token_id(tokenizer), device)
        inputs["use_cache"] = False
        every = [list(range(inputs["input_ids"].shape[1]))] * len(ids)
        (_, states), _ = graph(base=inputs, unit_locations={"base": [every] * len(layers)})
        states = torch.stack([s.float() for s in states])                     # [layer, batch, T, d]
        mask = inputs["attention_mask"].to(states.dtype)
        if read == "last":
            last = torch.tensor([len(i) - 1 for i in ids], device=device)
            out.append(states[:, torch.arange(len(ids), device=device), last])
        else:
            out.append((states * mask[None, :, :, None]).sum(2) / mask.sum(1)[None, :, None])
    return torch.cat(out, dim=1).cpu()


def first_direction(diffs: torch.Tensor) -> torch.Tensor:
    """RepE-style vector from paired differences ``[n, d]``: the top right singular vector of the
    uncentred differences, signed so that they project positively, scaled to their mean projection."""
    _, _, vh = torch.linalg.svd(diffs.double(), full_matrices=False)
    direction = vh[0]
    projection = (diffs.double() @ direction).mean()
    if projection < 0:
        direction, projection = -direction, -projection
    return (direction * projection).float()


def feature_vector(dictionary, P: torch.Tensor, N: torch.Tensor, feature: int | None) -> tuple[torch.Tensor, dict]:
    """``(d,)`` steering vector of one dictionary feature from positive and negative read states ``(n, d)``,
    and what it is (the feature, its activation difference)."""
    with torch.no_grad():
        diff = dictionary.encode(P).mean(0) - dictionary.encode(N).mean(0)
        f = int(diff.argmax()) if feature is None else feature
        return (dictionary.W_dec[f] * diff[f]).float().cpu(), {"feature": f, "activation_difference": float(diff[f])}


def estimate(model, tokenizer, positive: list[str], negative: list[str], *, layers: list[int],
             site: str = "block_output", read: str = "last", method: str = "mean_diff",
             model_name: str = "", dictionary=None, feature: int | None = None) -> SteeringVector:
    """Estimate one steering vector per layer (see the module docstring); `dictionary` and `feature` for
    `method: feature`."""
    from interventions.core import __version__

    P = read_states(model, tokenizer, positive, layers, site, read)
    N = read_states(model, tokenizer, negative, layers, site, read)
    chosen = {}
    if method == "feature":
        vector, chosen = feature_vector(dictionary, P[0], N[0], feature)
        vectors = {layers[0]: vector}
    elif method == "mean_diff":
        vectors = {l: P[i].mean(0) - N[i].mean(0) for i, l in enumerate(layers)}
    elif method == "pca":
        if len(positive) != len(negative):
            raise SteerError(f"`method: pca` needs paired prompts; got {len(positive)} positive and "
                             f"{len(negative)} negative")
        vectors = {l: first_direction(P[i] - N[i]) for i, l in enumerate(layers)}
    else:
        raise SteerError(f"`method`: {method!r}; expected 'mean_diff', 'pca' or 'feature'")
    meta = {"format_version": FORMAT_VERSION, "model": model_name, "site": site, "layers": sorted(layers),
            "method": method, "read": read, "pairs": len(positive) if len(positive) == len(negative) else None,
            "positive": len(positive), "negative": len(negative),
            "prompts_sha256": prompts_sha256(positive, negative),
            "norms": {str(l): float(v.norm()) for l, v in vectors.items()},
            "hidden_size": int(next(iter(vectors.values())).shape[0]), "lesion_version": __version__, **chosen}
    return SteeringVector(vectors, {k: v for k, v in meta.items() if k not in ("content_sha256", "integrity_sha256")})


def _row_seed(seed: int, prompt: str, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{prompt}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _eos_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids as `generate` uses them: the generation config's, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _position_mask(apply_to: str, is_prompt: torch.Tensor) -> torch.Tensor:
    """Where to add the vector (1.0) or not (0.0), from a float mask of the prompt's positions."""
    return {"all": torch.ones_like(is_prompt), "prompt": is_prompt, "generated": 1 - is_prompt}[apply_to]


class Steerer:
    """Adds ``coef × v`` through a pyvene graph while decoding; see `steering`."""

    def __init__(self, model, tokenizer, vector: SteeringVector, *, coef: float = 1.0, apply_to: str = "all"):
        if apply_to not in APPLY_TO:
            raise SteerError(f"`apply_to`: {apply_to!r}; expected one of {list(APPLY_TO)}")
        check_vector(model, vector, (coef,))
        self.model, self.tokenizer, self.vector = model, tokenizer, vector
        self.coef, self.apply_to = coef, apply_to
        table = site_table(model)
        self.graph = build_graph(model, [(table.component(vector.site, l), AddIntervention()) for l in vector.layers])
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.directions = [vector.vectors[l].to(self.device, dtype) for l in vector.layers]

    def forward(self, inputs: dict, coefs: torch.Tensor, mask: torch.Tensor):
        """One forward with ``coefs[row] × mask[row, pos] × v`` added at every position of `inputs`."""
        rows, width = inputs["input_ids"].shape
        scale = (coefs[:, None] * mask).to(self.directions[0].dtype)[:, :, None]
        if not bool(scale.any()):
            return self.model(**inputs)
        every = [list(range(width))] * rows
        reps = {key: scale * v for key, v in zip(self.graph.sorted_keys, self.directions)}
        _, out = self.graph(base=inputs, unit_locations={"base": [every] * len(self.directions)},
                            source_representations=reps)
        return out

    @torch.inference_mode()
    def generate_ids(self, prompts: list[str], *, coefs: list[float] | None = None, max_new_tokens: int = 20,
                     min_new_tokens: int = 0, temperature: float = 0.0, seed: int = 0,
                     sample_ids: list[int] | None = None) -> list[list[int]]:
        """New token ids per prompt (left-padded batch, KV cache, greedy unless `temperature` > 0).

        Finished rows are padded with the pad token after their end-of-sequence token, as
        `generate` does; the returned lists stop at (and include) that token. Before
        `min_new_tokens`, end-of-sequence is suppressed, as in `generate`.

        Sampling draws each row from its own generator, seeded by (seed, prompt, sample_ids[row]), so
        a row's text does not depend on the other rows of the batch, and rows that differ only in
        their coefficient share their random numbers (a paired comparison across coefficients)."""
        coefs = torch.tensor([self.coef] * len(prompts) if coefs is None else coefs, device=self.device)
        ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        width = max(map(len, ids))
        pad = pad_token_id(self.tokenizer)
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=self.device)
        attention = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=self.device)
        eos = _eos_ids(self.model, self.tokenizer)
        generators = None
        if temperature > 0:
            keys = sample_ids if sample_ids is not None else [0] * len(prompts)
            generators = [torch.Generator(device=self.device).manual_seed(_row_seed(seed, p, k))
                          for p, k in zip(prompts, keys)]
        cache = DynamicCache()
        step_ids, mask = input_ids, _position_mask(self.apply_to, torch.ones(len(ids), width, device=self.device))
        done = torch.zeros(len(ids), dtype=torch.bool, device=self.device)
        new = []
        for step in range(max_new_tokens):
            positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
            inputs = {"input_ids": step_ids, "attention_mask": attention, "position_ids": positions,
                      "past_key_values": cache, "use_cache": True, "logits_to_keep": 1}
            logits = self.forward(inputs, coefs, mask).logits[:, -1].float()
            if step < min_new_tokens and eos:
                logits[:, eos] = -float("inf")
            if temperature > 0:
                probs = (logits / temperature).softmax(-1)
                token = torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])
            else:
                token = logits.argmax(-1)
            token = torch.where(done, torch.full_like(token, pad), token)
            new.append(token)
            if eos:
                done |= torch.isin(token, torch.tensor(eos, device=self.device))
            if bool(done.all()):
                break
            step_ids = token[:, None]
            attention = torch.cat([attention, attention.new_ones(len(ids), 1)], dim=1)
            mask = _position_mask(self.apply_to, torch.zeros(len(ids), 1, device=self.device))
        out = torch.stack(new, dim=1).tolist()
        result = []
        for row in out:
            ends = [t for t, token in enumerate(row) if token in eos]
            result.append(row[: ends[0] + 1] if ends else row)
        return result

    def generate(self, prompts: list[str], **kwargs) -> list[str]:
        return [self.tokenizer.decode(t, skip_special_tokens=True) for t in self.generate_ids(prompts, **kwargs)]

    @torch.inference_mode()
    def continuation_logprobs(self, prompts: list[str], continuation: str, coefs: list[float]) -> list[float]:
        """Mean log-probability of `continuation`'s tokens after each prompt, steered (teacher forced):
        the continuation's positions count as generated ones for `apply_to`."""
        target = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        inputs = right_pad([i + target for i in ids], pad_token_id(self.tokenizer), self.device)
        inputs["use_cache"] = False
        width = inputs["input_ids"].shape[1]
        is_prompt = torch.tensor([[float(t < len(i)) for t in range(width)] for i in ids], device=self.device)
        mask = _position_mask(self.apply_to, is_prompt)
        logits = self.forward(inputs, torch.tensor(coefs, device=self.device), mask).logits
        return [continuation_logprob(logits[b], len(i), target) for b, i in enumerate(ids)]


@contextlib.contextmanager
def steering(model, tokenizer, vector: SteeringVector | str | Path, *, coef: float = 1.0, apply_to: str = "all"):
    """``with steering(model, tokenizer, "vector.safetensors", coef=4) as s: s.generate([...])``.

    The model's weights are never touched; its train/eval modes and requires_grad flags are
    restored on exit."""
    from interventions.core.runtime import eval_mode

    if not isinstance(vector, SteeringVector):
        vector = load_vector(vector)
    with eval_mode(model):
        yield Steerer(model, tokenizer, vector, coef=coef, apply_to=apply_to)
