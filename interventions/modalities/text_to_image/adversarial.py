"""Adversarial prompt search against an erasure, in the manner of UnlearnDiffAtk (Zhang et al. 2024) and
P4D (Chin et al. 2024): can a prompt still make the *edited* model show the erased concept?

`tokens` adversarial tokens are put before a concept prompt (after the text encoder's start token,
if it has one). Their input embeddings are optimised with Adam so that the edited UNet, conditioned
on the result, denoises the unedited model's own images of the concept: the diffusion loss

    E_{x0, t, eps} | eps_edited(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, context(adv + prompt)) - eps |^2

over `batch` draws per step. With ``space: tokens`` the forward pass uses each vector projected
to its nearest vocabulary token (by cosine; the gradient passes straight through to the continuous
vector, as in PEZ), so the result is a token sequence that can be typed; with ``space: soft`` the
vectors themselves are used (a stronger, white-box attack). Everything is seeded: the initial
tokens, the draws, and so the result (`attack` is a pure function of its arguments).

>>> found = attack(pipe, "a red circle", x0, AttackSpec(tokens=4, steps=40), seed=0)   # doctest: +SKIP
>>> found.text, found.context.shape                                                   # doctest: +SKIP
('dragon ruby a red circle', torch.Size([1, 24, 576]))
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from interventions.core.errors import SpecError
from interventions.modalities.text_to_image.pipeline import DiffusionPipe


@dataclass
class Attack:
    prompt: str               # the attacked prompt
    ids: list[int]            # the token ids of adversarial tokens + prompt (tokens space: what was used)
    text: str                 # those ids decoded
    context: torch.Tensor     # [1, L, d]: the UNet context the images come from
    losses: list[float]       # the diffusion loss per step
    tokens: int               # adversarial tokens used (fewer than asked where the prompt left no room)


@contextmanager
def replaced_embeddings(module: torch.nn.Module, positions: list[int], vectors: torch.Tensor):
    """Within the block, `module`'s output (token embeddings, [batch, L, d]) has `vectors` [k, d] at
    `positions`, for every row; a forward hook, removed on exit."""
    index = torch.tensor(positions, dtype=torch.long)

    def hook(_mod, _inp, out):
        out = out.clone()
        out[:, index] = vectors.to(out.dtype).unsqueeze(0).expand(out.shape[0], -1, -1)
        return out

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def adversarial_ids(pipe: DiffusionPipe, prompt: str, tokens: int) -> tuple[torch.Tensor, list[int]]:
    """``(ids [1, L], positions)``: the prompt's ids with `tokens` placeholders put before its text, or
    as many as the text encoder's length leaves room for (at least one)."""
    ids = pipe.tokenize([prompt])[0].tolist()
    pad = pipe.tokenizer.pad_token_id
    length = next((i for i, x in enumerate(ids) if x == pad and i > 0), len(ids))
    start = 1 if pipe.tokenizer.bos_token_id is not None and ids[0] == pipe.tokenizer.bos_token_id else 0
    tokens = min(tokens, len(ids) - length)
    if tokens < 1:
        raise SpecError("attack", prompt, f"a prompt that leaves room for adversarial tokens: it takes all "
                        f"{len(ids)} of the text encoder's tokens")
    out = ids[:start] + [ids[start]] * tokens + ids[start:length]
    out += [pad] * (len(ids) - len(out))
    return torch.tensor([out], device=pipe.device), list(range(start, start + tokens))


def vocabulary(pipe: DiffusionPipe) -> torch.Tensor:
    """The token ids an adversarial token may take: every id but the special ones."""
    special = set(pipe.tokenizer.all_special_ids)
    n = pipe.text_encoder.get_input_embeddings().weight.shape[0]
    return torch.tensor([i for i in range(min(n, len(pipe.tokenizer))) if i not in special])


def nearest_tokens(vectors: torch.Tensor, table: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The allowed token id nearest (cosine) to each vector."""
    sims = torch.nn.functional.normalize(vectors, dim=-1) @ torch.nn.functional.normalize(table[allowed], dim=-1).T
    return allowed[sims.argmax(dim=-1)]


def encode_with(pipe: DiffusionPipe, ids: torch.Tensor, positions: list[int], vectors: torch.Tensor) -> torch.Tensor:
    """The text encoder's states for `ids` with `vectors` as the embeddings at `positions` (differentiable)."""
    with replaced_embeddings(pipe.text_encoder.get_input_embeddings(), positions, vectors):
        return pipe.text_encoder(input_ids=ids).last_hidden_state


def to_x0(pipe: DiffusionPipe, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as the UNet's clean inputs (pixels in [-1, 1], or the VAE's scaled latents)."""
    x = images.to(pipe.device) * 2 - 1
    if pipe.vae is not None:
        with torch.no_grad():
            x = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    return x


def attack(pipe: DiffusionPipe, prompt: str, x0: torch.Tensor, spec, seed: int) -> Attack:
    """Search `spec.tokens` adversarial tokens before `prompt` (see the module doc); `x0`: the clean
    UNet inputs of the concept's images, [n, c, h, w]. Run it with the edit applied to `pipe`."""
    g = torch.Generator().manual_seed(seed)
    ids, positions = adversarial_ids(pipe, prompt, spec.tokens)
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    allowed = vocabulary(pipe)
    start = allowed[torch.randint(len(allowed), (len(positions),), generator=g)]
    soft = table[start.to(table.device)].clone().float().requires_grad_(True)
    opt = torch.optim.Adam([soft], lr=spec.lr * float(table.norm(dim=-1).mean()))
    alphas = pipe.scheduler.alphas_cumprod
    losses = []
    for _ in range(spec.steps):
        rows = torch.randint(len(x0), (spec.batch,), generator=g)
        t = torch.randint(0, len(alphas), (spec.batch,), generator=g)
        noise = torch.randn((spec.batch, *x0.shape[1:]), generator=g).to(x0.device, x0.dtype)
        a = alphas[t].to(x0.device, x0.dtype).view(-1, 1, 1, 1)
        xt = a.sqrt() * x0[rows.to(x0.device)] + (1 - a).sqrt() * noise
        with torch.enable_grad():
            if spec.space == "tokens":
                hard = table[nearest_tokens(soft.detach(), table, allowed).to(table.device)]
                used = soft + (hard - soft).detach()          # straight through (PEZ)
            else:
                used = soft
            context = encode_with(pipe, ids, positions, used)
            pred = pipe.unet(xt, t.to(x0.device), encoder_hidden_states=context.expand(spec.batch, -1, -1)).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
            (grad,) = torch.autograd.grad(loss, [soft])
        soft.grad = grad
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    with torch.no_grad():
        if spec.space == "tokens":
            final = ids.clone()
            final[0, positions] = nearest_tokens(soft, table, allowed).to(ids.device)
            context = pipe.encode_ids(final)
            ids = final
        else:
            context = encode_with(pipe, ids, positions, soft)
    text = pipe.tokenizer.decode([i for i in ids[0].tolist() if i != pipe.tokenizer.pad_token_id],
                                 skip_special_tokens=True)
    return Attack(prompt, ids[0].tolist(), text, context.detach(), losses, len(positions))
