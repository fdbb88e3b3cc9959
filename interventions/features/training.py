"""Training a feature dictionary on a model's own activations, streamed under a memory bound.

>>> dictionary, report = train_dictionary(model, tokenizer, texts, Where("block_output", 15, "smollm2-135m"),
...                                       features=4608, architecture="topk", k=32)      # doctest: +SKIP

- **Activations** come through the same pyvene collection the lenses use (`collect_states`), text by
  text, every position but the first (the first token's state is an outlier of huge norm in most
  language models; SAELens and Gemma Scope leave it out too); or, with another `read` (a VLM's
  images, `interventions.features.images`), the positions it names. Texts of similar length are
  batched together, and the forward stops at the collected layer (no later layer, no head over every
  position): at SmolLM2's layer 15 on 2 CPU threads that collects 1,259 tokens/s against 256 before. They fill a buffer of at most
  `buffer_tokens` rows, which is shuffled and consumed before the next one is collected, so memory
  stays bounded whatever the corpus size. A share of the texts is held out for the report.
- **Scale**: activations are scaled by one constant so that their mean squared norm is ``d_in``
  while training; the scale is folded back into the weights on save (x ↦ s·x: W_enc·s, W_dec/s,
  b_dec/s), so the saved dictionary reads raw activations, as SAELens's ``normalize_activations: none``.
- **TopK** (Gao et al. 2024): the loss is the reconstruction MSE plus ``aux_coefficient`` times the
  AuxK loss (the `aux_k` largest *dead* features, those silent for `dead_after` tokens, reconstruct
  the residual), decoder rows kept at unit norm, W_enc initialised as W_decᵀ, b_dec as the mean.
- **ReLU + L1** (Anthropic 2024 update): MSE + λ Σᵢ fᵢ ‖W_dec,i‖, λ warmed up over the first 5% of
  steps (or 1,000 without a step count); features dead for `dead_after` tokens are re-initialised (resampled) on inputs the
  dictionary reconstructs worst (Bricken et al. 2023), checked every 2,000 steps.
- **Report** (on the held-out texts): L0 (active features per token), explained variance
  ``1 - Σ‖x - x̂‖² / Σ‖x - mean‖²``, the share of dead features, and the cross-entropy of next
  tokens with x̂ spliced in (features only, no error term), against the clean model and against
  zero-ablating the site: loss recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean), SAELens's metric.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Iterator

import torch

from interventions.core.prompts import Encoded, encode, head
from interventions.features.dictionary import Dictionary, Where
from interventions.features.splice import MAX_TEXT_TOKENS, spliced_losses
from interventions.lenses.lens import collect_states

#: Reads a batch of inputs: each input's encoding and the positions whose states are kept.
Read = Callable[[list], list[tuple[Encoded, list[int]]]]
#: A dictionary's downstream losses on held-out inputs: ``{"clean", "spliced", "zero"}`` (mean cross-entropy).
Losses = Callable[[Dictionary, list], dict[str, float]]


def text_reader(tokenizer, max_tokens: int = MAX_TEXT_TOKENS) -> Read:
    """Texts, read at every position but the first, each cut to its first `max_tokens` tokens."""
    def read(texts: list[str]) -> list[tuple[Encoded, list[int]]]:
        encs = [head(encode(tokenizer, t, field="texts"), max_tokens) for t in texts]
        return [(e, list(range(1, len(e)))) for e in encs if len(e) > 1]
    return read


def stream_activations(model, tokenizer, texts: list, where: Where, *, buffer_tokens: int,
                       seed: int = 0, texts_per_pass: int = 192, read: Read | None = None) -> Iterator[torch.Tensor]:
    """Shuffled buffers ``Float[Tensor, "tokens d"]`` of at most `buffer_tokens` rows, each filled by
    collecting `where` over the next inputs at the positions `read` keeps (texts: 1 onward), until the
    inputs run out."""
    read = read or text_reader(tokenizer)
    g = torch.Generator().manual_seed(seed)
    pending: list[torch.Tensor] = []
    held = 0
    for lo in range(0, len(texts), texts_per_pass):
        got = read(texts[lo:lo + texts_per_pass])
        if not got:
            continue
        got.sort(key=lambda item: len(item[0]))          # similar lengths batch together: less padding
        states, _ = collect_states(model, tokenizer, [e for e, _ in got], [where.layer], site=where.site, logits=False)
        for s, (_, keep) in zip(states, got):
            pending.append(s[0, keep])
            held += len(pending[-1])
        while held >= buffer_tokens:
            rows = torch.cat(pending)
            yield rows[:buffer_tokens][torch.randperm(buffer_tokens, generator=g)]
            pending, held = [rows[buffer_tokens:]], len(rows) - buffer_tokens
    if held:
        rows = torch.cat(pending)
        yield rows[torch.randperm(len(rows), generator=g)]


def initialise(dictionary: Dictionary, sample: torch.Tensor, g: torch.Generator) -> None:
    """Unit-norm random decoder rows, W_enc = W_decᵀ, b_dec = the sample's mean, b_enc = 0."""
    with torch.no_grad():
        w = torch.randn(dictionary.d_sae, dictionary.d_in, generator=g)
        dictionary.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        dictionary.W_enc.copy_(dictionary.W_dec.T * (0.1 if dictionary.architecture == "standard" else 1.0))
        dictionary.b_dec.copy_(sample.mean(0))
        dictionary.b_enc.zero_()


def topk_loss(d: Dictionary, x: torch.Tensor, dead: torch.Tensor, aux_k: int, aux_coefficient: float):
    """MSE (normalised by the batch's variance) plus the AuxK loss on the dead features."""
    pre = d.pre_activations(x)
    f = d.activate(pre)
    recon = d.decode(f)
    variance = (x - x.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
    mse = (recon - x).pow(2).sum(-1).mean() / variance
    loss = mse
    if aux_k and bool(dead.any()):
        masked = pre.masked_fill(~dead, -math.inf)
        k = min(aux_k, int(dead.sum()))
        values, index = masked.topk(k, dim=-1)
        aux = torch.zeros_like(pre).scatter(-1, index, values.relu())
        residual = (x - recon).detach()
        aux_mse = (aux @ d.W_dec - residual).pow(2).sum(-1).mean() / variance
        loss = loss + aux_coefficient * torch.nan_to_num(aux_mse, nan=0.0)
    return loss, f


def relu_loss(d: Dictionary, x: torch.Tensor, l1: float):
    f = d.encode(x)
    recon = d.decode(f)
    variance = (x - x.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
    mse = (recon - x).pow(2).sum(-1).mean() / variance
    sparsity = (f * d.W_dec.norm(dim=1)).sum(-1).mean()
    return mse + l1 * sparsity, f


@torch.no_grad()
def resample_dead(d: Dictionary, x: torch.Tensor, dead: torch.Tensor, g: torch.Generator) -> int:
    """Re-initialise dead features on the inputs of `x` reconstructed worst (probability ∝ loss²)."""
    n = int(dead.sum())
    if not n:
        return 0
    errors = (d(x) - x).pow(2).sum(-1)
    chosen = x[torch.multinomial(errors / errors.sum(), n, replacement=n > len(x), generator=g)]
    directions = chosen - d.b_dec
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-8)
    alive = d.W_enc[:, ~dead].norm(dim=0).mean() if bool((~dead).any()) else torch.tensor(1.0)
    d.W_dec[dead] = directions
    d.W_enc[:, dead] = directions.T * alive * 0.2
    d.b_enc[dead] = 0.0
    return n


def _step(d: Dictionary, x: torch.Tensor, opt, settings: dict, since: torch.Tensor, warm: float):
    """One optimiser step; returns the loss and updates `since` (tokens since each feature last fired)."""
    dead = since >= settings["dead_after"]
    if d.architecture == "topk":
        loss, f = topk_loss(d, x, dead, settings["aux_k"], settings["aux_coefficient"])
    else:
        loss, f = relu_loss(d, x, settings["l1"] * min(1.0, warm))
    opt.zero_grad()
    loss.backward()
    if d.architecture == "topk":              # keep decoder rows at unit norm: drop the gradient along them
        with torch.no_grad():
            w = d.W_dec
            w.grad -= (w.grad * w).sum(1, keepdim=True) * w
    opt.step()
    if d.architecture == "topk":
        with torch.no_grad():
            d.W_dec /= d.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
    fired = (f > 0).any(0)
    since += len(x)
    since[fired] = 0
    return float(loss.detach())


def progress(message: str) -> None:
    print(message, flush=True)


def fit(buffers: Iterable[torch.Tensor], d_in: int, *, features: int, architecture: str = "topk", k: int = 32,
        l1: float = 0.3, steps: int | None = None, batch_tokens: int = 1024, lr: float | None = None,
        dead_after: int = 200_000, where: Where | None = None, seed: int = 0,
        log: Callable[[str], None] | None = progress) -> tuple[Dictionary, dict]:
    """A dictionary fitted to activation `buffers` (each ``Float[Tensor, "tokens d_in"]``, consumed in
    batches), its scale folded in; and the training state (steps, tokens, seconds, resampled). `log`
    gets a progress line every 200 steps (default: printed at once, so a redirected log shows it; None:
    nothing)."""
    d = Dictionary(d_in, features, architecture, k=k if architecture == "topk" else None, where=where)
    g = torch.Generator().manual_seed(seed)
    settings = {"dead_after": dead_after, "aux_k": min(512, features // 2), "aux_coefficient": 1 / 32, "l1": l1}
    state = {"step": 0, "scale": None, "seconds": 0.0, "tokens": 0, "resampled": 0, "loss": math.nan}
    for buffer in buffers:
        _train_on(d, buffer, state, settings, g, steps, batch_tokens, lr, log)
    fold_scale(d, state["scale"] or 1.0)
    return d.eval(), {k: v for k, v in state.items() if k not in ("opt", "since")}


def train_dictionary(model, tokenizer, texts: list, where: Where, *, heldout: float = 0.1, epochs: int = 1,
                     buffer_tokens: int = 65536, seed: int = 0, read: Read | None = None,
                     losses: Losses | None = None, **options) -> tuple[Dictionary, dict]:
    """Train on the activations of `texts` (all but the held-out share), `epochs` passes, streamed in
    buffers of at most `buffer_tokens` rows (`options`: `fit`'s); see the module docstring. `read` and
    `losses` replace the text reader and the next-token losses for other inputs (a VLM's images).
    Returns the dictionary and its report on the held-out inputs."""
    width = model.config.get_text_config(decoder=True).hidden_size
    cut = max(1, int(len(texts) * (1 - heldout)))
    train, test = texts[:cut], texts[cut:] or texts[-1:]
    start = time.perf_counter()
    with _frozen(model):
        buffers = _epochs(lambda: stream_activations(model, tokenizer, train, where, buffer_tokens=buffer_tokens,
                                                     seed=seed, read=read), epochs, seed)
        d, state = fit(buffers, width, where=where, seed=seed, **options)
        report = evaluate_dictionary(d, model, tokenizer, test, read=read, losses=losses)
    report.update(architecture=d.architecture, features=d.d_sae, k=d.k, train_texts=len(train), heldout_texts=len(test),
                  train_tokens=state["tokens"], steps=state["step"], resampled=state["resampled"], seed=seed,
                  seconds=round(time.perf_counter() - start, 1),
                  tokens_per_second=round(state["tokens"] / max(state["seconds"], 1e-9)), options=options)
    d.meta = {"report": report}
    return d, report


def _epochs(stream: Callable[[], Iterator[torch.Tensor]], epochs: int, seed: int) -> Iterator[torch.Tensor]:
    """`epochs` passes over the buffers `stream()` yields; a corpus that fits one buffer is collected once
    and reshuffled for each later pass (the model runs once, memory stays within the buffer)."""
    g = torch.Generator().manual_seed(seed + 1)
    first = []
    for buffer in stream():
        if len(first) < 2:
            first.append(buffer)
        yield buffer
    for _ in range(epochs - 1):
        if len(first) == 1:
            yield first[0][torch.randperm(len(first[0]), generator=g)]
        else:
            yield from stream()


def _train_on(d: Dictionary, buffer: torch.Tensor, state: dict, settings: dict, g, steps, batch_tokens, lr, log):
    """Consume one buffer of activations in batches (initialising on the first)."""
    if state["scale"] is None:
        state["scale"] = float((d.d_in / buffer.pow(2).sum(-1).mean()).sqrt())
        initialise(d, buffer * state["scale"], g)
        state["opt"] = torch.optim.Adam(d.parameters(), lr=lr or (2e-4 if d.architecture == "topk" else 5e-5) *
                                        (2 ** 14 / d.d_sae) ** 0.5)
        state["since"] = torch.zeros(d.d_sae, dtype=torch.long)
    total = steps or 10 ** 9
    t0 = time.perf_counter()
    for lo in range(0, len(buffer) - batch_tokens + 1, batch_tokens):
        if state["step"] >= total:
            break
        x = buffer[lo:lo + batch_tokens] * state["scale"]
        warm = state["step"] / (0.05 * steps) if steps else state["step"] / 1000
        state["loss"] = _step(d, x, state["opt"], settings, state["since"], warm)
        state["step"] += 1
        state["tokens"] += len(x)
        if d.architecture == "standard" and state["step"] % 2000 == 0:
            state["resampled"] += resample_dead(d, x, state["since"] >= settings["dead_after"], g)
        if log and state["step"] % 200 == 0:
            log(f"step {state['step']}: loss {state['loss']:.4f}, {state['tokens']:,} tokens")
    state["seconds"] += time.perf_counter() - t0


class _frozen:
    """The model's parameters without gradients inside the block (restored after)."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)
        return False


@torch.no_grad()
def fold_scale(d: Dictionary, scale: float) -> None:
    """Make a dictionary trained on ``scale · x`` read raw ``x`` (exactly the same features)."""
    d.W_enc.mul_(scale)                 # pre-activations are unchanged, so are TopK and JumpReLU choices
    d.W_dec.div_(scale)
    d.b_dec.div_(scale)


@torch.no_grad()
def evaluate_dictionary(d: Dictionary, model, tokenizer, texts: list, *, max_tokens: int = 8192,
                        read: Read | None = None, losses: Losses | None = None) -> dict:
    """L0, explained variance and dead share on `texts`' activations (as `read` keeps them), and the loss
    recovered (`losses`; default: next-token losses on the texts, `splice.spliced_losses`)."""
    rows = torch.cat(list(stream_activations(model, tokenizer, texts, d.where, buffer_tokens=max_tokens,
                                             read=read)))[:max_tokens]
    f = d.encode(rows)
    recon = d.decode(f)
    residual = (rows - recon).pow(2).sum()
    total = (rows - rows.mean(0)).pow(2).sum()
    losses = (losses or (lambda d, texts: spliced_losses(d, model, tokenizer, texts)))(d, texts)
    gap = losses["zero"] - losses["clean"]        # undefined when zero-ablating the site costs nothing
    recovered = None if gap < 1e-3 else round((losses["zero"] - losses["spliced"]) / gap, 4)
    return {"heldout_tokens": len(rows), "l0": round(float((f > 0).sum(-1).float().mean()), 2),
            "explained_variance": round(float(1 - residual / total), 4),
            "dead_share": round(float(((f > 0).sum(0) == 0).float().mean()), 4),
            "ce_clean": round(losses["clean"], 4), "ce_spliced": round(losses["spliced"], 4),
            "ce_zero_ablated": round(losses["zero"], 4), "loss_recovered": recovered}
