"""ROME in a vision-language model: rewrite a fact whose subject arrives as an image.

The same rank-one edit as `editors.methods.rome`, with the key and the value read where the visual
subject is represented: the image tokens of ``[prefix] <image>... question``. k* is their mean key
over the questions (and over several renders of the subject, when given: the image analogue of
ROME's context templates), and v* = W k* + δ is optimised with one δ added at every image token. (Reading only the
last image token fails on the testbed: its image tokens have near-identical keys, so the edit
moves all of them, and a value tuned for one token overshoots.) The edited MLP then maps the
image's key to a value that makes the LM give `target_new` to questions about that image; other
images (other keys) are left nearly alone.

    W' = W + Λ (C⁻¹k*)ᵀ,   Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*)

C is the second moment of the layer's keys on text (`editors.stats`), passed in, optionally plus
that of the image-token keys of an image corpus (`image_key_moment`): with it, ROME knows which
directions other images use and leaves them alone.

>>> delta, info = compute_vlm_rome(vlm, tokenizer, pixels, [" The capital of this country is"], "Rome",
...                                layer=6, C=C, base_model="llava-flags-smollm2")      # doctest: +SKIP
"""

from __future__ import annotations

import torch

from editors.delta import Delta
from editors.methods.rome import (
    RomeHyperparameters,
    frozen_parameters,
    hooked,
    optimise_delta,
    rank_one_update,
    weight_name,
)
from interventions.modalities.vision_language.llava import image_positions, image_prompt
from interventions.models.sites import LLAVA


def _images(pixels: torch.Tensor) -> torch.Tensor:
    """``(n, 3, H, W)``: one image ``(3, H, W)`` or several renders of the same subject."""
    return pixels[None] if pixels.dim() == 3 else pixels


def _batch(vlm, tokenizer, pixels: torch.Tensor, questions: list[str], suffix: list[int] | None = None):
    """Right-padded ids of the image prompts (+ `suffix`) for every (image, question), their pixel
    batch, and each row's image positions and last real position."""
    images = _images(pixels)
    rows = [image_prompt(tokenizer, vlm, q) + (suffix or []) for _ in images for q in questions]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dev = next(vlm.parameters()).device
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=dev)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=dev)
    key_at = [image_positions(r, vlm) for r in rows]
    return {"input_ids": ids, "attention_mask": mask,
            "pixel_values": images.repeat_interleave(len(questions), dim=0).to(dev),
            "use_cache": False}, key_at, [len(r) - 1 for r in rows]


@torch.no_grad()
def compute_k_star(vlm, tokenizer, pixels, questions: list[str], layer: int) -> torch.Tensor:
    """Mean key (input of the MLP's output projection) over the image tokens, the images and the questions."""
    inputs, key_at, _ = _batch(vlm, tokenizer, pixels, questions)
    keep = {}
    with hooked(LLAVA.module(vlm, "mlp_key", layer), lambda m, args: keep.__setitem__("k", args[0]), pre=True):
        vlm(**inputs)
    return torch.cat([keep["k"][r, pos] for r, pos in enumerate(key_at)]).float().mean(0)


@torch.no_grad()
def image_key_moment(vlm, tokenizer, images: torch.Tensor, layer: int, *, batch: int = 16) -> tuple[torch.Tensor, int]:
    """``(Σ k kᵀ / n, n)`` over the keys at the image tokens of ``[prefix] <image>`` for each image in
    `images` ``(N, 3, H, W)``. Causal attention makes those keys independent of the text after the
    image, so no question is needed. Added to the text C, it tells ROME which directions other images
    use, so that the rank-one update leaves them alone."""
    module = LLAVA.module(vlm, "mlp_key", layer)
    ids = image_prompt(tokenizer, vlm, "")
    at = image_positions(ids, vlm)
    dev = next(vlm.parameters()).device
    total, count, keep = None, 0, {}
    with hooked(module, lambda m, args: keep.__setitem__("k", args[0]), pre=True):
        for lo in range(0, len(images), batch):
            chunk = images[lo:lo + batch].to(dev)
            vlm(input_ids=torch.tensor([ids] * len(chunk), device=dev), pixel_values=chunk, use_cache=False)
            k = keep["k"][:, at].reshape(-1, keep["k"].shape[-1]).double()
            total = k.T @ k + (0 if total is None else total)
            count += len(k)
    if count == 0:
        raise ValueError("`image_corpus`: got no images; expected at least one")
    return (total / count).float().cpu(), count


def compute_v_star(vlm, tokenizer, pixels, questions: list[str], target_new: str, layer: int,
                   hp: RomeHyperparameters, kl_question: str = " This is the flag of") -> tuple[torch.Tensor, dict]:
    """The MLP output at the image tokens that makes the LM answer `target_new` to every question about
    every image; a KL term keeps each image's answer distribution after `kl_question` where it was.

    v* = (the mean MLP output over the image tokens, i.e. W k*) + δ, with one δ added at every image token."""
    module = LLAVA.module(vlm, "mlp_output", layer)
    images = _images(pixels)
    n_img, n_q = len(images), len(questions)
    target = tokenizer(target_new, add_special_tokens=False).input_ids     # as written, as text ROME takes it
    prompts = [image_prompt(tokenizer, vlm, q) for q in questions]
    kl_row = image_prompt(tokenizer, vlm, kl_question)
    seqs = [p + target[:-1] for _ in images for p in prompts] + [kl_row] * n_img   # answers follow each question
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dev = next(vlm.parameters()).device
    n = n_img * n_q
    batch = {"input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=dev),
             "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=dev),
             "pixel_values": torch.cat([images.repeat_interleave(n_q, dim=0), images]).to(dev), "use_cache": False}
    positions = [image_positions(s, vlm) for s in seqs]
    rows = torch.tensor([r for r, pos in enumerate(positions) for _ in pos], device=dev)
    lookup = torch.tensor([p for pos in positions for p in pos], device=dev)
    answer_row = [r for r in range(n) for _ in target]
    answer_at = [len(prompts[r % n_q]) - 1 + j for r in range(n) for j in range(len(target))]
    answer_tok = torch.tensor(target * n, device=dev)
    kl_at = len(kl_row) - 1
    delta = torch.zeros(vlm.config.text_config.hidden_size, device=dev, requires_grad=True)
    state, kl_init = {}, {}

    def add_delta(m, args, out):
        h = out[0] if isinstance(out, tuple) else out
        if "init" not in state:
            state["init"] = h[rows, lookup].detach().float().mean(0)
        h = h.clone()
        h[rows, lookup] = h[rows, lookup] + delta
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def losses(active=None):
        logp = vlm(**batch).logits.float().log_softmax(-1)
        answers = logp[torch.tensor(answer_row), torch.tensor(answer_at)]
        nll = -answers.gather(1, answer_tok[:, None]).mean()
        state["most_probable"] = (answers.argmax(-1) == answer_tok).all()
        kl_logp = logp[n:, kl_at]
        if "p" not in kl_init:
            kl_init["p"] = kl_logp.detach().clone()
        kl = torch.nn.functional.kl_div(kl_logp, kl_init["p"], log_target=True, reduction="sum") / n_img
        return nll, kl

    with frozen_parameters(vlm), hooked(module, add_delta), torch.enable_grad():
        history = optimise_delta(delta, state, hp, losses)
    return (state["init"] + delta.detach()).float(), {"history": history,
                                                      "delta_norm": float(delta.detach().norm())}


def compute_vlm_rome(vlm, tokenizer, pixels: torch.Tensor, questions: list[str], target_new: str, *, layer: int,
                     C: torch.Tensor, base_model: str, hp: RomeHyperparameters | None = None,
                     kl_question: str = " This is the flag of", spec: dict | None = None) -> tuple[Delta, dict]:
    """The rank-one edit for one image ``(3, H, W)`` or several renders of one subject ``(n, 3, H, W)``:
    ``(Delta, details)``; the model is left unchanged. `kl_question` (text after the image) is the
    prompt whose next-token distribution v* keeps, per image."""
    hp = hp or RomeHyperparameters(layer=layer)
    if not 0 <= layer < LLAVA.num_layers(vlm):
        raise ValueError(f"`layer`: got {layer}; expected a layer in [0, {LLAVA.num_layers(vlm) - 1}]")
    from interventions.core.runtime import eval_mode

    with eval_mode(vlm):
        k_star = compute_k_star(vlm, tokenizer, pixels, questions, layer)
        v_star, info = compute_v_star(vlm, tokenizer, pixels, questions, target_new, layer, hp, kl_question)
    W = LLAVA.module(vlm, "mlp_key", layer).weight.detach().float().cpu()
    lam, left = rank_one_update(W, C.cpu(), k_star.cpu(), v_star.cpu(), hp.mom2_ridge)
    delta = Delta.from_factors(vlm, {weight_name(vlm, layer): (lam, left)}, method="rome-vlm", base_model=base_model,
                               hyperparameters=hp.recorded(layer=layer),
                               spec=spec or {"questions": list(questions), "target_new": target_new,
                                                   "key": "mean over the image tokens", "kl_question": kl_question})
    return delta, {"k_star": k_star, "v_star": v_star, **info}
