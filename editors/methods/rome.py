"""ROME (Meng et al. 2022): a rank-one edit of one MLP output projection that rewrites one fact.

    W' = W + Λ (C⁻¹k*)ᵀ,   Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*)

- k*: the key (input of the MLP's output projection, site `mlp_key`) at the
  subject's last token, averaged over the prompt behind a set of generated prefixes.
- v*: the MLP output that makes the model say the new target. It is found by
  optimising a vector δ added at the subject's last token: the target's NLL,
  plus a KL term keeping "{subject} is a" unchanged, plus weight decay, with δ's
  norm clamped.
- C: the second moment of the layer's keys (`editors.stats`).

So the edited layer maps k* to v* exactly: that is r-ROME (Gupta et al. 2024). ROME as published
(`method="rome"`) computes Λ with the plain prompt's key instead, so the layer maps that key, not k*,
to v*; sequential edits then collapse (see `rank_one_update`).

`compute_targets` finds v* for a whole batch of requests at once (EMMET, MEMIT and AlphaEdit use it
too), running only the layers from the edit layer up. Computing never changes the model
(the invariant of ROME's ``execute_rome``): it returns a `Delta`, and only
`apply` / `applied` write weights.

>>> request = EditRequest("{} is located in the city of", "The Eiffel Tower", " Rome")
>>> delta, details = compute_rome(model, tokenizer, request, RomeHyperparameters(layer=5),
...                               base_model="smollm2-135m")                                   # doctest: +SKIP
>>> with applied(model, delta): ...                                                                  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from editors.delta import Delta
from editors.stats import OPENINGS, model_samples, second_moment
from interventions.core.prompts import overlapping, pad_token_id, right_pad
from interventions.models.sites import get_module, site_table
from interventions.spec import RomeHyperparameters

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


class _Replay(torch.nn.Module):
    """Stands in for a decoder layer below the edit: returns the output that layer gave on the first
    pass, whatever its input (which is the same every pass). Attributes such as ``attention_type``
    are the real layer's."""

    def __init__(self, layer: torch.nn.Module, output):
        super().__init__()
        self.__dict__["_layer"] = layer                     # not registered: no second copy of its weights
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"], name)


@contextmanager
def replaying(model, below: int, output):
    """Within the block, decoder layers ``0 .. below-1`` return `output` (layer ``below-1``'s cached
    output) instead of computing: a forward costs only the layers from `below` on. The layers are put
    back afterwards, also on error."""
    table = site_table(model)
    swapped = []
    try:
        for layer in range(below):
            path = table.component("block_output", layer)
            holder = get_module(model, path.rsplit("[", 1)[0])
            real = holder[layer]
            holder[layer] = _Replay(real, output)
            swapped.append((holder, layer, real))
        yield
    finally:
        for holder, layer, real in swapped:
            holder[layer] = real


def request_keys(tokenizer, request: "EditRequest", templates: list[str]) -> list[tuple[list[int], int]]:
    """(token ids, subject-last index) of the request's prompt behind each template."""
    return [encode_at(tokenizer, *request.text(t), len(request.subject)) for t in templates]


@torch.no_grad()
def compute_keys(model, tokenizer, layer: int, requests: list["EditRequest"], templates: list[str],
                 batch: int = 64) -> torch.Tensor:
    """Each request's key (input of layer `layer`'s MLP output projection) at the subject's last token,
    averaged over `templates`: ``Float[Tensor, "n d_mlp"]``. ROME's k*; MEMIT's and EMMET's K columns."""
    module = site_table(model).module(model, "mlp_key", layer)
    device = next(model.parameters()).device
    encoded = [e for r in requests for e in request_keys(tokenizer, r, templates)]
    keys = []
    keep = {}
    with hooked(module, lambda m, args: keep.__setitem__("k", args[0]), pre=True):
        for start in range(0, len(encoded), batch):
            part = encoded[start:start + batch]
            model(**right_pad([ids for ids, _ in part], pad_token_id(tokenizer), device), use_cache=False)
            keys.append(keep["k"][torch.arange(len(part)), torch.tensor([i for _, i in part])].float())
    return torch.cat(keys).reshape(len(requests), len(templates), -1).mean(1)


def compute_k_star(model, tokenizer, layer: int, request: "EditRequest", templates: list[str]) -> torch.Tensor:
    """ROME's k* of one request: ``Float[Tensor, "d_mlp"]`` (see `compute_keys`)."""
    return compute_keys(model, tokenizer, layer, [request], templates)[0]


def compute_targets(model, tokenizer, layer: int, requests: list["EditRequest"], templates: list[str],
                    hp: "RomeHyperparameters", site: str = "mlp_output", *, fast: bool = True) -> tuple[torch.Tensor, dict]:
    """For each request, the output of `site` (ROME, EMMET: the MLP; MEMIT, AlphaEdit: the block) at
    layer `layer`, at the subject's last token, that makes the model answer `target_new`:
    ``(Float[Tensor, "n d"], details)``.

    All requests are optimised together: one δ row per request, added at its own rows; the loss is
    the sum of the requests' losses, so with Adam (elementwise) each row follows the path it would
    follow alone (`optimise_delta`). Each request's rows are its prompt behind every template, plus
    "{subject} is a" for the KL term.

    `fast`: the layers below `layer` are computed once and their output reused (`replaying`), and the
    vocabulary projection is applied only where a loss reads it. `fast=False` runs the whole model
    every step: the plain path, which the fast one must reproduce.
    """
    search = _TargetSearch(model, tokenizer, layer, requests, templates, site, fast)
    with frozen_parameters(model), hooked(search.module, search.add_delta), torch.enable_grad():
        history = optimise_delta(search.delta, search.state, hp, search.losses)
        with torch.no_grad():
            final, _ = search.losses(torch.ones(len(requests), dtype=torch.bool, device=search.device))
    delta = search.delta.detach()
    return (search.state["init"] + delta).float(), {
        "history": history, "v_init_norm": search.state["init"].norm(dim=1).tolist(),
        "delta_norm": delta.norm(dim=1).tolist(), "final_nll": final.tolist()}


class _Rows:
    """The batch `compute_targets` runs: per request, its prompt behind every template (the answer's
    tokens appended, teacher-forced), then "{subject} is a" for the KL term."""

    def __init__(self, tokenizer, requests: list["EditRequest"], templates: list[str]):
        self.seqs, self.lookup, self.owner, self.answers, self.kl_at, self.first_row = [], [], [], [], [], []
        for i, request in enumerate(requests):
            target = tokenizer(request.target_new, add_special_tokens=False)["input_ids"]
            self.first_row.append(len(self.seqs))
            for ids, at in request_keys(tokenizer, request, templates):
                row = len(self.seqs)
                self.add(ids + target[:-1], at, i)
                self.answers += [(row, len(ids) - 1 + j, tok, i, len(templates) * len(target))
                                 for j, tok in enumerate(target)]
            kl_ids, kl_idx = encode_at(tokenizer, *EditRequest("{} is a", request.subject, request.target_new).text(),
                                       len(request.subject))
            self.kl_at.append((len(self.seqs), len(kl_ids) - 1))
            self.add(kl_ids, kl_idx, i)

    def add(self, ids: list[int], at: int, owner: int) -> None:
        self.seqs.append(ids)
        self.lookup.append(at)
        self.owner.append(owner)


class _TargetSearch:
    """The state of one `compute_targets` call: the rows, the δ being optimised, and the hooks' shared
    state (the unedited values at the edited position, the cached lower layers, the KL reference)."""

    def __init__(self, model, tokenizer, layer: int, requests, templates, site: str, fast: bool):
        table = site_table(model)
        self.model, self.layer, self.fast, self.table = model, layer, fast, table
        self.module = table.module(model, site, layer)
        self.device = device = next(model.parameters()).device
        rows = _Rows(tokenizer, requests, templates)
        self.n, self.n_seqs, self.first_row = len(requests), len(rows.seqs), rows.first_row
        self.inputs = right_pad(rows.seqs, pad_token_id(tokenizer), device)
        self.lookup = torch.tensor(rows.lookup, device=device)
        self.owner = torch.tensor(rows.owner, device=device)
        self.a_row, self.a_pos, self.a_tok, self.a_req, self.a_norm = (
            torch.tensor(x, device=device) for x in zip(*rows.answers))
        self.kl_row, self.kl_pos = (torch.tensor(x, device=device) for x in zip(*rows.kl_at))
        width = model.get_input_embeddings().weight.shape[1]
        self.delta = torch.zeros(self.n, width, device=device, requires_grad=True)
        self.state, self.kl_init, self.below = {}, {}, {}
        self.last = table.module(model, "block_output", table.num_layers(model) - 1)
        self.readout = table.readout(model)
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.now = {"rows": torch.arange(self.n_seqs, device=device), "lookup": self.lookup, "owner": self.owner}

    def add_delta(self, m, args, out):
        """Forward hook on the edited site: δ added at each row's subject position."""
        h = out[0] if isinstance(out, tuple) else out
        if "init" not in self.state:
            first = torch.tensor(self.first_row, device=self.device)
            self.state["init"] = h[first, self.lookup[self.first_row]].detach().clone()
        h = h.clone()
        h[self.now["rows"], self.now["lookup"]] = h[self.now["rows"], self.now["lookup"]] + self.delta[self.now["owner"]]
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def _keep_last(self, m, args, out):
        self.below["last"] = out[0] if isinstance(out, tuple) else out

    def run_rows(self, sel: torch.Tensor) -> torch.Tensor:
        """The last block's output on rows `sel` (fast path): the first pass runs the whole model and
        keeps layer-1's output; later passes replay it, on the rows of requests still optimising."""
        self.now.update(rows=torch.arange(len(sel), device=self.device), lookup=self.lookup[sel], owner=self.owner[sel])
        part = {k: v[sel] for k, v in self.inputs.items()}
        with hooked(self.last, self._keep_last):
            if self.layer > 0 and "output" not in self.below:
                lower = self.table.module(self.model, "block_output", self.layer - 1)
                with hooked(lower, lambda m, a, out: self.below.__setitem__("output", out)):
                    self.model(**part, use_cache=False, logits_to_keep=1)
            else:
                cached = self.below.get("output")
                if cached is not None:
                    cached = cached[sel] if torch.is_tensor(cached) else (cached[0][sel], *cached[1:])
                with replaying(self.model, self.layer, cached):
                    self.model(**part, use_cache=False, logits_to_keep=1)
        return self.below["last"]

    def _logprobs(self, active: torch.Tensor, ask_rows: torch.Tensor, ask_pos: torch.Tensor) -> torch.Tensor:
        if not self.fast:
            return self.model(**self.inputs, use_cache=False).logits[ask_rows, ask_pos].float().log_softmax(-1)
        device = self.device
        sel = active[self.owner].nonzero()[:, 0]
        remap = torch.full((self.n_seqs,), -1, device=device, dtype=torch.long)
        remap[sel] = torch.arange(len(sel), device=device)
        keep = active[torch.cat([self.a_req, torch.arange(self.n, device=device)])]
        h = self.run_rows(sel)[remap[ask_rows[keep]], ask_pos[keep]]
        logp = torch.zeros(len(ask_rows), self.vocab, device=device)
        return logp.index_put((keep.nonzero()[:, 0],), self.readout(h).float().log_softmax(-1))

    def losses(self, active: torch.Tensor):
        """(NLL, KL) per request; only `active` requests' values are computed on the fast path (the
        others are 0: `optimise_delta` has frozen them)."""
        logp = self._logprobs(active, torch.cat([self.a_row, self.kl_row]), torch.cat([self.a_pos, self.kl_pos]))
        answers = logp[: len(self.a_row)]
        picked = answers.gather(1, self.a_tok[:, None])[:, 0]
        nll = torch.zeros(self.n, device=self.device).index_add(0, self.a_req, -picked / self.a_norm)
        missed = (answers.argmax(-1) != self.a_tok).float().detach()
        self.state["most_probable"] = torch.zeros(self.n, device=self.device).index_add(0, self.a_req, missed) == 0
        kl_logp = logp[len(self.a_row):]
        if "p" not in self.kl_init:
            self.kl_init["p"] = kl_logp.detach().clone()
        kl = torch.nn.functional.kl_div(kl_logp, self.kl_init["p"], log_target=True, reduction="none").sum(-1)
        return nll, kl * active


def stopped(nll: torch.Tensor, state: dict, early_stop: str) -> torch.Tensor:
    """Which requests' optimisation may stop now: an NLL below 0.05 (ROME), or, with ``mpes`` (ENCORE's
    most-probable early stopping), also every target token already the top-1 prediction at every one of
    the request's prompt rows (``state["most_probable"]``, which `losses` sets)."""
    done = nll < 5e-2
    return done | state["most_probable"].reshape(done.shape) if early_stop == "mpes" else done


def optimise_delta(delta: torch.Tensor, state: dict, hp: "RomeHyperparameters", losses) -> list[dict]:
    """ROME's search for v*: Adam on δ (added to the edited site by the caller's hook) against
    NLL + `kl_factor` · KL + `v_weight_decay` · (|δ| / |v_init|)², δ's norm clamped to
    `clamp_norm_factor` · |v_init|; stops once the NLL is below 0.05 (or, with ``early_stop: mpes``, the
    target is the top-1 prediction everywhere: `stopped`). `losses(active)` runs the model
    and returns ``(nll, kl)``, where only the `active` rows' values matter; the hook stores the
    unedited value in ``state["init"]``.

    δ is ``[d]`` (one request) or ``[n, d]`` (one row per request, with ``state["init"]`` and the
    losses per row). The rows are independent: the loss is their sum, Adam works elementwise, each
    row is clamped by its own norm, and a row whose NLL is below 0.05 is frozen from then on, as a
    request optimised alone would stop there.
    """
    rows = delta if delta.dim() == 2 else delta[None]
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    done = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
    history = []
    for step in range(hp.v_steps):
        opt.zero_grad()
        active = ~done
        nll, kl = (x.reshape(-1) for x in losses(active))
        init_norm = state["init"].reshape(rows.shape).norm(dim=1)
        decay = hp.v_weight_decay * (rows.norm(dim=1) / init_norm) ** 2
        loss = nll + hp.kl_factor * kl + decay
        history.append({"step": step, "nll": nll[active].mean().item(), "kl": kl[active].mean().item(),
                        "loss": loss[active].mean().item(), "optimising": int(active.sum())})
        done |= active & stopped(nll.detach(), state, hp.early_stop)
        if bool(done.all()):
            break
        frozen = rows.detach()[done].clone()
        loss[~done].sum().backward()
        opt.step()
        with torch.no_grad():
            limit = hp.clamp_norm_factor * init_norm[:, None]
            norms = rows.norm(dim=1, keepdim=True)
            rows.mul_(torch.where(norms > limit, limit / norms, torch.ones_like(norms)))
            rows[done] = frozen
    return history


def is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D"   # GPT-2 stores [in, out]


def weight_name(model, layer: int) -> str:
    """The `named_parameters` name of the edited projection's weight."""
    path = site_table(model).component("mlp_key", layer).rsplit(".", 1)[0]
    return path.replace("[", ".").replace("]", "") + ".weight"


def rank_one_update(W: torch.Tensor, C: torch.Tensor, k_star: torch.Tensor, v_star: torch.Tensor,
                    ridge: float = 0.0, key: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Λ [out, 1], (C⁻¹k*)ᵀ [1, in]) with ``Λ = (v* − W key) / ((C⁻¹k*)ᵀ key)``, so that
    ``(W + Λ (C⁻¹k*)ᵀ) key = v*``. W is [out, in].

    r-ROME: `key` is k* itself (the default), the template-averaged key whose positions the v*
    optimisation edited. ROME as published: `key` is the key of the plain prompt (no prefix), while
    C⁻¹k* uses the averaged one; the layer then maps the plain key, not k*, to v*.
    """
    key = k_star if key is None else key
    C = C.double()
    C = C + ridge * torch.trace(C) / C.shape[0] * torch.eye(C.shape[0], dtype=C.dtype)
    left = torch.linalg.solve(C, k_star.double())
    lam = (v_star.double() - W.double() @ key.double()) / (left @ key.double())
    return lam[:, None].float(), left[None, :].float()


#: ROME's two variants: the published update, and r-ROME's (Gupta et al. 2024), whose key is consistent.
ROME_METHODS = ("rome", "r-rome")


def weight_matrix(model, layer: int) -> torch.Tensor:
    """The edited projection's weight as [out, in] float32 on the CPU (GPT-2's Conv1D transposed)."""
    module = site_table(model).module(model, "mlp_key", layer)
    W = module.weight.detach().float().cpu()
    return W.T if is_conv1d(module) else W


def as_factors(model, layer: int, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of ``u @ v`` ([out, r] @ [r, in]) in the parameter's own layout (GPT-2: transposed)."""
    module = site_table(model).module(model, "mlp_key", layer)
    return (v.T, u.T) if is_conv1d(module) else (u, v)


def compute_rome(model, tokenizer, request: EditRequest, hp: RomeHyperparameters, *, base_model: str,
                 C: torch.Tensor | None = None, corpus: list[str] | None = None,
                 spec: dict | None = None, method: str = "rome",
                 templates: list[str] | None = None) -> tuple[Delta, dict]:
    """The ROME (`method` ``rome``) or r-ROME (``r-rome``) edit of one request: ``(rank-one Delta,
    details)``; the model is left unchanged. `templates`: context templates drawn earlier (a
    sequential run draws them once, as ROME caches them); by default drawn from the model now.

    `details` holds k*, the plain prompt's key, v*, the templates and the optimisation history.
    """
    if method not in ROME_METHODS:
        raise ValueError(f"`method`: got {method!r}; expected one of {', '.join(ROME_METHODS)}")
    table = site_table(model)
    if not 0 <= hp.layer < table.num_layers(model):
        raise ValueError(f"`layer`: got {hp.layer}; expected a layer in [0, {table.num_layers(model) - 1}]")
    from interventions.core.runtime import eval_mode

    with eval_mode(model):
        if templates is None:
            templates = context_templates(model, tokenizer, hp.context_templates, hp.seed)
        k_star = compute_k_star(model, tokenizer, hp.layer, request, templates)
        k_plain = compute_k_star(model, tokenizer, hp.layer, request, ["{}"])
        (v_star,), info = compute_targets(model, tokenizer, hp.layer, [request], templates, hp)
        if C is None:
            C = second_moment(model, tokenizer, hp.layer, corpus, max_tokens=hp.mom2_tokens)
    key = k_star if method == "r-rome" else k_plain
    lam, left = rank_one_update(weight_matrix(model, hp.layer), C.cpu(), k_star.cpu(), v_star.cpu(), hp.mom2_ridge,
                                key=key.cpu())
    agreement = key_agreement(left, k_star.cpu(), k_plain.cpu())
    if method == "rome" and agreement < KEY_AGREEMENT_WARNING:
        log.warning("ROME edit of %r: the plain prompt's key agrees with k* only %.3f as much as k* itself, so "
                    "this update is about %.0fx r-ROME's and may disable other facts (method: r-rome avoids it)",
                    request.subject, agreement, 1 / max(agreement, 1e-6))
    delta = Delta.from_factors(model, {weight_name(model, hp.layer): as_factors(model, hp.layer, lam, left)},
                               method=method, base_model=base_model, hyperparameters=hp.recorded(),
                               spec=spec or {"requests": [asdict(request)]},
                               metrics={"v_star_nll": info["final_nll"][0], "key_agreement": agreement})
    return delta, {"k_star": k_star, "k_plain": k_plain, "v_star": v_star, "templates": templates,
                   "key_agreement": agreement, **info}


#: Below this `key_agreement`, a ROME edit warns: its update is at least this many times r-ROME's denominator.
KEY_AGREEMENT_WARNING = 0.25


def key_agreement(left: torch.Tensor, k_star: torch.Tensor, k_plain: torch.Tensor) -> float:
    """``(C⁻¹k*)ᵀ k_plain / (C⁻¹k*)ᵀ k*``: ROME's denominator over r-ROME's (`left` is ``(C⁻¹k*)ᵀ``).

    Near 1 the two updates agree. Near 0 the plain prompt's key is almost orthogonal to k* in C⁻¹'s
    metric, so ROME's Λ, and the update's norm, grow by its inverse: on SmolLM2 a subject that is the
    prompt's first token (the tokenizer adds no BOS, so that key sees no context) gave 0.055, one update
    of 0.89 × ‖W‖, and held-out accuracy fell from 0.88 to 0.40 in that one edit."""
    left = left.double().reshape(-1)
    return float((left @ k_plain.double()) / (left @ k_star.double()))


def rome_step(editor, requests: list["EditRequest"]):
    """The `Editor`'s step for ROME and r-ROME: one request, at `spec.layer`."""
    (request,) = requests
    spec = editor.spec
    delta, info = compute_rome(editor.model, editor.tokenizer, request, editor.hp, C=editor.C[spec.layer],
                               method=spec.method, base_model=spec.model, templates=editor.templates)
    return delta, {"subject": request.subject, "v_star_nll": info["final_nll"][0],
                   "key_agreement": info["key_agreement"]}
