"""Second-moment statistics C = E[k kᵀ] of a layer's MLP keys, streamed over a corpus and cached on disk.

ROME and MEMIT need C for the keys at their edit layer (the input of the MLP's
output projection, site `mlp_key`). The cache key is the model's fingerprint,
the layer, the corpus' hash and the token count, so a cached matrix is reused
only for exactly that setting.

>>> corpus = model_samples(model, tokenizer, n_texts=64, seed=0)          # doctest: +SKIP
>>> C = second_moment(model, tokenizer, layer=5, corpus=corpus)            # doctest: +SKIP
>>> C.shape                                                                # doctest: +SKIP
torch.Size([1536, 1536])

The offline default corpus is text *sampled from the model itself*, from short
generic openings. It is not Wikipedia (ROME's choice); it is what can be had
without a network, and it measures the keys the model produces on its own text.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from interventions.core.atomic import atomic_save_file
from interventions.core.prompts import pad_token_id
from interventions.models.loading import lesion_home
from interventions.models.sites import site_table

log = logging.getLogger(__name__)

OPENINGS = ("The", "Therefore", "Because", "I", "You", "In", "When", "A", "It", "There")


@torch.no_grad()
def model_samples(model, tokenizer, *, n_texts: int = 64, length: int = 64, seed: int = 0,
                  openings=OPENINGS, batch: int = 16) -> list[str]:
    """`n_texts` texts sampled (top-k 5, as ROME's generator) from the model after generic openings."""
    torch.manual_seed(seed)
    texts = []
    pad = pad_token_id(tokenizer)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, n_texts, batch):
            heads = [openings[i % len(openings)] for i in range(start, min(start + batch, n_texts))]
            enc = tokenizer(heads, return_tensors="pt", padding=True).to(next(model.parameters()).device)
            out = model.generate(**enc, do_sample=True, top_k=5, max_new_tokens=length, pad_token_id=pad)
            texts += tokenizer.batch_decode(out, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return texts


def model_fingerprint(model) -> str:
    """A hash of the model's config and every parameter's bytes (about a second for 135M parameters)."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, p in model.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _corpus_hash(corpus: list[str]) -> str:
    return hashlib.sha256(json.dumps(corpus).encode()).hexdigest()


@torch.no_grad()
def collect_keys_moment(model, tokenizer, layers: list[int], corpus: list[str], *, max_tokens: int,
                        batch: int = 16, max_length: int = 128) -> tuple[dict[int, torch.Tensor], int]:
    """Σ k kᵀ / n at each of `layers`, over the corpus' non-pad tokens (up to `max_tokens`), in one pass."""
    table = site_table(model)
    device = next(model.parameters()).device
    totals: dict[int, torch.Tensor] = {}
    keep: dict = {}
    handles = [table.module(model, "mlp_key", layer).register_forward_pre_hook(
        lambda m, args, layer=layer: keep.__setitem__(layer, args[0])) for layer in layers]
    count = 0
    try:
        for start in range(0, len(corpus), batch):
            if count >= max_tokens:
                break
            enc = tokenizer(corpus[start:start + batch], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length).to(device)
            model(**enc, use_cache=False)
            mask = enc["attention_mask"].bool()
            take = min(int(mask.sum()), max_tokens - count)
            for layer in layers:
                keys = keep[layer][mask].double()[:take]
                totals[layer] = keys.T @ keys + totals.get(layer, 0)
            count += take
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("`corpus`: got no tokens; expected at least one non-empty text")
    return {layer: (total / count).float() for layer, total in totals.items()}, count


def _sample_shape(max_tokens: int) -> tuple[int, int]:
    """How many model samples, of how many tokens, the default corpus draws."""
    return max(16, max_tokens // 48), 64


def stats_paths(model, layers: list[int], corpus: list[str] | None = None, *, max_tokens: int = 20_000,
                corpus_name: str = "model-samples", cache_dir: str | Path | None = None) -> dict[int, Path]:
    """Where C of each layer is cached: keyed by model fingerprint, layer, corpus and token count."""
    n_texts, length = _sample_shape(max_tokens)
    corpus_id = _corpus_hash(corpus) if corpus is not None else f"model-samples:seed0:{n_texts}x{length}"
    folder = Path(cache_dir) if cache_dir is not None else lesion_home() / "stats"
    fingerprint = model_fingerprint(model)
    return {layer: folder / ("mom2-" + hashlib.sha256(json.dumps(
        [fingerprint, layer, corpus_name, corpus_id, max_tokens]).encode()).hexdigest()[:24] + ".safetensors")
        for layer in layers}


def second_moments(model, tokenizer, layers: list[int], corpus: list[str] | None = None, *,
                   max_tokens: int = 20_000, corpus_name: str = "model-samples",
                   cache_dir: str | Path | None = None) -> dict[int, torch.Tensor]:
    """C for each layer, from the disk cache where this exact setting was computed before.

    Missing layers are computed together in one pass. With no `corpus`, the model's own
    samples are used; they are identified by how they are drawn (seed, count, length)
    and generated only when some layer misses the cache.
    """
    n_texts, length = _sample_shape(max_tokens)
    paths = stats_paths(model, layers, corpus, max_tokens=max_tokens, corpus_name=corpus_name, cache_dir=cache_dir)
    folder = next(iter(paths.values())).parent
    out = {layer: load_file(str(p))["C"] for layer, p in paths.items() if p.is_file()}
    missing = [layer for layer in layers if layer not in out]
    if missing:
        if corpus is None:
            corpus = model_samples(model, tokenizer, n_texts=n_texts, length=length, seed=0)
        computed, n = collect_keys_moment(model, tokenizer, missing, corpus, max_tokens=max_tokens)
        folder.mkdir(parents=True, exist_ok=True)
        for layer, C in computed.items():
            atomic_save_file({"C": C.contiguous()}, paths[layer],
                             {"layer": str(layer), "tokens": str(n), "corpus": corpus_name})
            log.info("second moment of layer %d over %d tokens cached at %s", layer, n, paths[layer])
        out.update(computed)
    return out


def second_moment(model, tokenizer, layer: int, corpus: list[str] | None = None, **kwargs) -> torch.Tensor:
    """C for one layer (see `second_moments`)."""
    return second_moments(model, tokenizer, [layer], corpus, **kwargs)[layer]
