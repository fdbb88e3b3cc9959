"""ROME (Meng et al. 2022): a rank-one edit of one MLP output projection that rewrites one fact.

    W' = W + Λ (C⁻¹k*)ᵀ,   Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*)

- k*: the key (input of the MLP's output projection, site `mlp_key`) at the
  subject's last token, averaged over the prompt behind a set of generated prefixes.
- v*: the MLP output that makes the model say the new target. It is found by
  optimising a vector δ added at the subject's last token: the target's NLL,
  plus a KL term keeping "{subject} is a" unchanged, plus weight decay, with δ's
  norm clamped.
- C: the second moment of the layer's keys (`editors.stats`).

So the edited layer maps k* to v* exactly. Computing never changes the model
(the invariant of ROME's ``execute_rome``): it returns a `Delta`, and only
`apply` / `applied` write weights.

>>> request = EditRequest("{} is located in the city of", "The Eiffel Tower", " Rome")
>>> delta, details = compute_rome(model, tokenizer, request, RomeHyperParams(layer=5),
...                               base_model="smollm2-135m")                                   # doctest: +SKIP
>>> with applied(model, delta): ...                                                                  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from interventions.prompts import overlapping, pad_token_id, right_pad
from interventions.sites import site_table

from .delta import Delta
from .stats import OPENINGS, model_samples, second_moment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditRequest:
    """Rewrite `prompt` (with ``{}`` for the subject) about `subject` to answer `target_new`."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self):
        if self.prompt.count("{}") != 1:
            raise ValueError(f"`prompt`: got {self.prompt!r}; expected exactly one '{{}}' where the subject goes")
        if not self.subject or not self.target_new:
            raise ValueError("`subject` and `target_new` must be non-empty")

    def text(self, template: str = "{}") -> tuple[str, int]:
        """The full text behind `template`, and the subject's character offset in it."""
        before, after = template.replace("{}", self.prompt).split("{}", 1)
        return before + self.subject + after, len(before)


@dataclass(frozen=True)
class RomeHyperParams:
    """ROME's hyperparameters; the defaults are ROME's GPT-2 XL values."""

    layer: int
    v_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    context_templates: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))   # (tokens, how many)
    mom2_tokens: int = 20_000
    mom2_ridge: float = 1e-4        # × mean eigenvalue, added to C before solving
    seed: int = 0

    def __post_init__(self):
        for name in ("v_steps", "mom2_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        for name in ("v_lr", "clamp_norm_factor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}")
        for name in ("v_weight_decay", "kl_factor", "mom2_ridge"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be non-negative, got {getattr(self, name)}")


def context_templates(model, tokenizer, lengths=((5, 10), (10, 10)), seed: int = 0) -> list[str]:
    """``["{}"]`` plus generated prefixes ``"<text>. {}"`` (ROME's random contexts)."""
    out = ["{}"]
    for i, (length, count) in enumerate(lengths):
        texts = model_samples(model, tokenizer, n_texts=count, length=length, seed=seed + i, openings=OPENINGS[:5])
        out += [t.replace("{", " ").replace("}", " ") + ". {}" for t in texts]
    return out


def encode_at(tokenizer, text: str, start: int, length: int) -> tuple[list[int], int]:
    """Token ids of `text` and the index of the last token overlapping chars [start, start+length)."""
    enc = tokenizer(text, return_offsets_mapping=True)
    end = start + length
    hits = overlapping(enc["offset_mapping"], start, end)
    if not hits:
        raise ValueError(f"`subject`: no token covers it in {text!r}")
    return list(enc["input_ids"]), hits[-1]


@contextmanager
def hooked(module, fn, pre: bool = False):
    handle = module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def frozen_parameters(model):
    """No parameter gradients while optimising δ; flags restored afterwards."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


@torch.no_grad()
def compute_k_star(model, tokenizer, layer: int, request: EditRequest, templates: list[str]) -> torch.Tensor:
    """Mean key at the subject's last token over the context templates: ``Float[Tensor, "d_mlp"]``."""
    module = site_table(model).module(model, "mlp_key", layer)
    encoded = [encode_at(tokenizer, *request.text(t), len(request.subject)) for t in templates]
    inputs = right_pad([ids for ids, _ in encoded], pad_token_id(tokenizer), next(model.parameters()).device)
    keep = {}
    with hooked(module, lambda m, args: keep.__setitem__("k", args[0]), pre=True):
        model(**inputs, use_cache=False)
    rows = torch.arange(len(encoded))
    return keep["k"][rows, torch.tensor([i for _, i in encoded])].float().mean(0)


def compute_v_star(model, tokenizer, layer: int, request: EditRequest, templates: list[str],
                   hp: RomeHyperParams, site: str = "mlp_output") -> tuple[torch.Tensor, dict]:
    """The output of `site` (ROME: the MLP; MEMIT: the block) at the subject's last token that makes
    the model answer `target_new`."""
    module = site_table(model).module(model, site, layer)
    device = next(model.parameters()).device
    target = tokenizer(request.target_new, add_special_tokens=False)["input_ids"]
    rewrite = [encode_at(tokenizer, *request.text(t), len(request.subject)) for t in templates]
    kl_req = EditRequest("{} is a", request.subject, request.target_new)
    kl_ids, kl_idx = encode_at(tokenizer, *kl_req.text(), len(request.subject))
    seqs = [ids + target[:-1] for ids, _ in rewrite] + [kl_ids]
    lookup = torch.tensor([i for _, i in rewrite] + [kl_idx], device=device)
    inputs = right_pad(seqs, pad_token_id(tokenizer), device)
    answer_at = [len(ids) - 1 + j for ids, _ in rewrite for j in range(len(target))]
    answer_row = [r for r in range(len(rewrite)) for _ in target]
    answer_tok = torch.tensor(target * len(rewrite), device=device)
    rows = torch.arange(len(seqs), device=device)
    delta = torch.zeros(model.get_input_embeddings().weight.shape[1], device=device, requires_grad=True)
    state = {}

    def add_delta(m, args, out):
        h = out[0] if isinstance(out, tuple) else out
        if "init" not in state:
            state["init"] = h[0, lookup[0]].detach().clone()
        h = h.clone()
        h[rows, lookup] = h[rows, lookup] + delta
        return (h, *out[1:]) if isinstance(out, tuple) else h

    kl_init = {}

    def losses():
        logp = model(**inputs, use_cache=False).logits.float().log_softmax(-1)
        nll = -logp[torch.tensor(answer_row), torch.tensor(answer_at), answer_tok].sum() / len(rewrite) / len(target)
        kl_logp = logp[-1, len(kl_ids) - 1]
        if "p" not in kl_init:
            kl_init["p"] = kl_logp.detach().clone()
        return nll, torch.nn.functional.kl_div(kl_logp, kl_init["p"], log_target=True, reduction="sum")

    with frozen_parameters(model), hooked(module, add_delta), torch.enable_grad():
        history = optimise_delta(delta, state, hp, losses)
        with torch.no_grad():
            logp = model(**inputs, use_cache=False).logits.float().log_softmax(-1)
            final = -logp[torch.tensor(answer_row), torch.tensor(answer_at), answer_tok].reshape(len(rewrite), -1)
    return (state["init"] + delta.detach()).float(), {
        "history": history, "v_init_norm": float(state["init"].norm()), "delta_norm": float(delta.detach().norm()),
        "final_nll_per_template": final.mean(1).tolist()}


def optimise_delta(delta: torch.Tensor, state: dict, hp: RomeHyperParams, losses) -> list[dict]:
    """ROME's search for v*: Adam on δ (added to the edited site by the caller's hook) against
    NLL + `kl_factor` · KL + `v_weight_decay` · (|δ| / |v_init|)², δ's norm clamped to
    `clamp_norm_factor` · |v_init|; stops early once the NLL is below 0.05. `losses()` runs the
    model and returns ``(nll, kl)``; the hook stores the unedited value in ``state["init"]``."""
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    history = []
    for step in range(hp.v_steps):
        opt.zero_grad()
        nll, kl = losses()
        decay = hp.v_weight_decay * (delta.norm() / state["init"].norm()) ** 2
        loss = nll + hp.kl_factor * kl + decay
        history.append({"step": step, "nll": nll.item(), "kl": kl.item(), "loss": loss.item()})
        if nll.item() < 5e-2:
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            limit = hp.clamp_norm_factor * state["init"].norm()
            if delta.norm() > limit:
                delta.mul_(limit / delta.norm())
    return history


def is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D"   # GPT-2 stores [in, out]


def weight_name(model, layer: int) -> str:
    """The `named_parameters` name of the edited projection's weight."""
    path = site_table(model).component("mlp_key", layer).rsplit(".", 1)[0]
    return path.replace("[", ".").replace("]", "") + ".weight"


def rank_one_update(W: torch.Tensor, C: torch.Tensor, k_star: torch.Tensor, v_star: torch.Tensor,
                    ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(Λ [out, 1], (C⁻¹k*)ᵀ [1, in]) with ``(W + Λ (C⁻¹k*)ᵀ) k* = v*``. W is [out, in]."""
    C = C.double()
    C = C + ridge * torch.trace(C) / C.shape[0] * torch.eye(C.shape[0], dtype=C.dtype)
    left = torch.linalg.solve(C, k_star.double())
    lam = (v_star.double() - W.double() @ k_star.double()) / (left @ k_star.double())
    return lam[:, None].float(), left[None, :].float()


def compute_rome(model, tokenizer, request: EditRequest, hp: RomeHyperParams, *, base_model: str,
                 C: torch.Tensor | None = None, corpus: list[str] | None = None,
                 spec: dict | None = None) -> tuple[Delta, dict]:
    """The ROME edit of one request: ``(rank-one Delta, details)``; the model is left unchanged.

    `details` holds k*, v*, the context templates and the optimisation history.
    """
    table = site_table(model)
    if not 0 <= hp.layer < table.num_layers(model):
        raise ValueError(f"`layer`: got {hp.layer}; expected a layer in [0, {table.num_layers(model) - 1}]")
    was_training = model.training
    model.eval()
    try:
        templates = context_templates(model, tokenizer, hp.context_templates, hp.seed)
        k_star = compute_k_star(model, tokenizer, hp.layer, request, templates)
        v_star, info = compute_v_star(model, tokenizer, hp.layer, request, templates, hp)
        if C is None:
            C = second_moment(model, tokenizer, hp.layer, corpus, max_tokens=hp.mom2_tokens)
    finally:
        model.train(was_training)
    module = table.module(model, "mlp_key", hp.layer)
    W = module.weight.detach().float().cpu()
    W = W.T if is_conv1d(module) else W
    lam, left = rank_one_update(W, C.cpu(), k_star.cpu(), v_star.cpu(), hp.mom2_ridge)
    factors = (left.T, lam.T) if is_conv1d(module) else (lam, left)
    hyper = {**asdict(hp), "context_templates": [list(x) for x in hp.context_templates]}
    delta = Delta.from_factors(model, {weight_name(model, hp.layer): factors}, method="rome", base_model=base_model,
                               hyperparameters=hyper, spec=spec or {"requests": [asdict(request)]},
                               metrics={"v_star_nll": sum(info["final_nll_per_template"])
                                        / len(info["final_nll_per_template"])})
    return delta, {"k_star": k_star, "v_star": v_star, "templates": templates, **info}
