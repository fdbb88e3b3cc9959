"""ROME in a vision-language model: rewrite a fact whose subject arrives as an image.

The same rank-one edit as `editors.rome`, with the key and the value read where the visual
subject is represented: the image tokens of ``[prefix] <image>... question``. k* is their mean key
over the questions, and v* is optimised with one δ added at every image token. (Reading only the
last image token fails on the testbed: its image tokens have near-identical keys, so the edit
moves all of them, and a value tuned for one token overshoots.) The edited MLP then maps the
image's key to a value that makes the LM give `target_new` to questions about that image; other
images (other keys) are left nearly alone.

    W' = W + Λ (C⁻¹k*)ᵀ,   Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*)

C is the second moment of the layer's keys on text (`editors.stats`), passed in: for an
assembled LLaVA it is the language model's own, computed on the bare LM.

>>> delta, info = compute_vlm_rome(vlm, tokenizer, pixels, [" The capital of this country is"], "Rome",
...                                layer=6, C=C, base_model="llava-flags-smollm2")      # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from interventions.sites import LLAVA
from interventions.vlm import image_positions, image_prompt

from .delta import Delta
from .rome import RomeHyperParams, _frozen, _hook, optimise_delta, rank_one_update, weight_name


def _batch(vlm, tokenizer, pixels: torch.Tensor, questions: list[str], suffix: list[int] | None = None):
    """Right-padded ids of the image prompts (+ `suffix`), their pixel batch, and each row's last image
    position and last real position."""
    rows = [image_prompt(tokenizer, vlm, q) + (suffix or []) for q in questions]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dev = next(vlm.parameters()).device
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=dev)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=dev)
    key_at = [image_positions(r, vlm) for r in rows]
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels[None].expand(len(rows), -1, -1, -1).to(dev),
            "use_cache": False}, key_at, [len(r) - 1 for r in rows]


@torch.no_grad()
def compute_k_star(vlm, tokenizer, pixels, questions: list[str], layer: int) -> torch.Tensor:
    """Mean key (input of the MLP's output projection) over the image tokens and the questions."""
    inputs, key_at, _ = _batch(vlm, tokenizer, pixels, questions)
    keep = {}
    with _hook(LLAVA.module(vlm, "mlp_key", layer), lambda m, args: keep.__setitem__("k", args[0]), pre=True):
        vlm(**inputs)
    return torch.cat([keep["k"][r, pos] for r, pos in enumerate(key_at)]).float().mean(0)


def compute_v_star(vlm, tokenizer, pixels, questions: list[str], target_new: str, layer: int,
                   hp: RomeHyperParams, kl_question: str = " This is the flag of") -> tuple[torch.Tensor, dict]:
    """The MLP output at the image tokens that makes the LM answer `target_new` to every question;
    a KL term keeps the answer distribution of `kl_question` (naming) where it was."""
    module = LLAVA.module(vlm, "mlp_output", layer)
    target = tokenizer(" " + target_new.strip(), add_special_tokens=False).input_ids
    prompts = [image_prompt(tokenizer, vlm, q) for q in questions]
    kl_row = image_prompt(tokenizer, vlm, kl_question)
    seqs = [p + target[:-1] for p in prompts] + [kl_row]        # answer tokens follow each question
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dev = next(vlm.parameters()).device
    n = len(questions)
    batch = {"input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=dev),
             "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=dev),
             "pixel_values": pixels[None].expand(n + 1, -1, -1, -1).to(dev), "use_cache": False}
    positions = [image_positions(s, vlm) for s in seqs]
    rows = torch.tensor([r for r, pos in enumerate(positions) for _ in pos], device=dev)
    lookup = torch.tensor([p for pos in positions for p in pos], device=dev)
    answer_row = [r for r in range(n) for _ in target]
    answer_at = [len(prompts[r]) - 1 + j for r in range(n) for j in range(len(target))]
    answer_tok = torch.tensor(target * n, device=dev)
    kl_len = len(kl_row)
    delta = torch.zeros(vlm.config.text_config.hidden_size, device=dev, requires_grad=True)
    state, kl_init = {}, {}

    def add_delta(m, args, out):
        h = out[0] if isinstance(out, tuple) else out
        if "init" not in state:
            state["init"] = h[0, lookup[0]].detach().clone()
        h = h.clone()
        h[rows, lookup] = h[rows, lookup] + delta
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def losses():
        logp = vlm(**batch).logits.float().log_softmax(-1)
        nll = -logp[torch.tensor(answer_row), torch.tensor(answer_at), answer_tok].mean()
        kl_logp = logp[n, kl_len - 1]
        if "p" not in kl_init:
            kl_init["p"] = kl_logp.detach().clone()
        return nll, torch.nn.functional.kl_div(kl_logp, kl_init["p"], log_target=True, reduction="sum")

    with _frozen(vlm), _hook(module, add_delta), torch.enable_grad():
        history = optimise_delta(delta, state, hp, losses)
    return (state["init"] + delta.detach()).float(), {"history": history,
                                                      "delta_norm": float(delta.detach().norm())}


def compute_vlm_rome(vlm, tokenizer, pixels: torch.Tensor, questions: list[str], target_new: str, *, layer: int,
                     C: torch.Tensor, base_model: str, hp: RomeHyperParams | None = None,
                     kl_question: str = " This is the flag of", spec: dict | None = None) -> tuple[Delta, dict]:
    """The rank-one edit for one image: ``(Delta, details)``; the model is left unchanged.
    `kl_question` (text after the image) is the prompt whose next-token distribution v* keeps."""
    hp = hp or RomeHyperParams(layer=layer)
    if not 0 <= layer < LLAVA.num_layers(vlm):
        raise ValueError(f"`layer`: got {layer}; expected a layer in [0, {LLAVA.num_layers(vlm) - 1}]")
    was_training = vlm.training
    vlm.eval()
    try:
        k_star = compute_k_star(vlm, tokenizer, pixels, questions, layer)
        v_star, info = compute_v_star(vlm, tokenizer, pixels, questions, target_new, layer, hp, kl_question)
    finally:
        vlm.train(was_training)
    W = LLAVA.module(vlm, "mlp_key", layer).weight.detach().float().cpu()
    lam, left = rank_one_update(W, C.cpu(), k_star.cpu(), v_star.cpu(), hp.mom2_ridge)
    delta = Delta.from_factors(vlm, {weight_name(vlm, layer): (lam, left)}, method="rome-vlm", base_model=base_model,
                               hyperparameters={**asdict(hp), "layer": layer,
                                                "context_templates": [list(x) for x in hp.context_templates]},
                               spec=spec or {"questions": list(questions), "target_new": target_new,
                                                   "key": "mean over the image tokens", "kl_question": kl_question})
    return delta, {"k_star": k_star, "v_star": v_star, **info}
