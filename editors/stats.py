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
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from interventions.models import lesion_home
from interventions.sites import site_table

log = logging.getLogger(__name__)

OPENINGS = ("The", "Therefore", "Because", "I", "You", "In", "When", "A", "It", "There")


@torch.no_grad()
def model_samples(model, tokenizer, *, n_texts: int = 64, length: int = 64, seed: int = 0,
                  openings=OPENINGS, batch: int = 16) -> list[str]:
    """`n_texts` texts sampled (top-k 5, as ROME's generator) from the model after generic openings."""
    torch.manual_seed(seed)
    texts = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
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
def collect_keys_moment(model, tokenizer, layer: int, corpus: list[str], *, max_tokens: int,
                        batch: int = 16, max_length: int = 128) -> tuple[torch.Tensor, int]:
    """Σ k kᵀ / n over the corpus' non-pad tokens, up to `max_tokens`; returns (C, n)."""
    table = site_table(model)
    module = table.module(model, "mlp_key", layer)
    device = next(model.parameters()).device
    total, count = None, 0
    keep: dict = {}
    handle = module.register_forward_pre_hook(lambda m, args: keep.__setitem__("k", args[0]))
    try:
        for start in range(0, len(corpus), batch):
            if count >= max_tokens:
                break
            enc = tokenizer(corpus[start:start + batch], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length).to(device)
            model(**enc, use_cache=False)
            keys = keep["k"][enc["attention_mask"].bool()].double()[: max_tokens - count]
            total = keys.T @ keys if total is None else total + keys.T @ keys
            count += keys.shape[0]
    finally:
        handle.remove()
    if count == 0:
        raise ValueError("`corpus`: got no tokens; expected at least one non-empty text")
    return (total / count).float(), count


def second_moment(model, tokenizer, layer: int, corpus: list[str] | None = None, *, max_tokens: int = 20_000,
                  corpus_name: str = "model-samples", cache_dir: str | Path | None = None) -> torch.Tensor:
    """C for `layer`, from the disk cache when this exact setting was computed before.

    With no `corpus`, the model's own samples are used; they are identified by how they
    are drawn (seed, count, length) and generated only when the cache misses.
    """
    n_texts, length = max(16, max_tokens // 48), 64
    corpus_id = _corpus_hash(corpus) if corpus is not None else f"model-samples:seed0:{n_texts}x{length}"
    key = hashlib.sha256(json.dumps([model_fingerprint(model), layer, corpus_name, corpus_id,
                                     max_tokens]).encode()).hexdigest()[:24]
    folder = Path(cache_dir) if cache_dir is not None else lesion_home() / "stats"
    path = folder / f"mom2-{key}.safetensors"
    if path.is_file():
        return load_file(str(path))["C"]
    if corpus is None:
        corpus = model_samples(model, tokenizer, n_texts=n_texts, length=length, seed=0)
    C, n = collect_keys_moment(model, tokenizer, layer, corpus, max_tokens=max_tokens)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".mom2-", dir=folder)
    os.close(fd)
    save_file({"C": C.contiguous()}, tmp, metadata={"layer": str(layer), "tokens": str(n), "corpus": corpus_name})
    os.replace(tmp, path)
    log.info("second moment of layer %d over %d tokens cached at %s", layer, n, path)
    return C
