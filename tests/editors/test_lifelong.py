"""Lifelong editing: ENCORE's norm constraint and early stopping, UltraEdit's closed form with lifelong
normalisation, the update norm bound, and the generation-based evaluation's matching rule. Expected
values come from independent computations: the objective's gradient (autograd), NumPy, plain hooks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from editors.delta import applied, relative_norms
from editors.editor import compute_edit
from editors.evaluate import greedy_continuations, states
from editors.methods.memit import anchored, layer_update, trimmed_mean
from editors.methods.rome import EditRequest, optimise_delta
from editors.methods.ultraedit import compute_ultraedit, running_sums
from interventions import parse_spec
from interventions.spec import RomeHyperparameters, UltraEditHyperparameters
from support.models import make_model

REQUESTS = [{"prompt": "{} is located in the city of", "subject": "the eiffel tower", "target_new": "rome",
             "target_true": "paris"},
            {"prompt": "{} is located in the city of", "subject": "big ben", "target_new": "paris",
             "target_true": "london"}]


def test_the_norm_constrained_update_minimises_encores_objective():
    """ΔW = R Kᵀ(λC + KKᵀ + μI)⁻¹ zeroes the gradient of ‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ) + μ‖ΔW‖², and a
    larger μ gives a smaller update."""
    g = torch.Generator().manual_seed(0)
    K, R = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    A = torch.randn(12, 12, generator=g, dtype=torch.float64)
    C = A @ A.T / 12
    norms = []
    for mu in (0.0, 1.0, 10.0):
        u, v = layer_update(K, R, C, 2.0, mu)
        W = (u.double() @ v.double()).requires_grad_(True)
        loss = ((W @ K - R) ** 2).sum() + 2.0 * torch.trace(W @ C @ W.T) + mu * (W ** 2).sum()
        (grad,) = torch.autograd.grad(loss, W)
        assert grad.abs().max() < 1e-4 * W.abs().max()
        norms.append(float(W.detach().norm()))
    assert norms[0] > norms[1] > norms[2]


def test_preserved_keys_add_their_term_to_memits_objective():
    """With S = w K_s K_sᵀ, ΔW = R Kᵀ(λC + KKᵀ + S + μI)⁻¹ zeroes the gradient of ‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ)
    + w‖ΔW K_s‖² + μ‖ΔW‖², and a larger w moves the preserved keys less."""
    g = torch.Generator().manual_seed(1)
    K, R = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    Ks = torch.randn(12, 5, generator=g, dtype=torch.float64)
    A = torch.randn(12, 12, generator=g, dtype=torch.float64)
    C = A @ A.T / 12
    moved = []
    for w in (0.0, 1.0, 100.0):
        u, v = layer_update(K, R, C, 2.0, 0.5, w * Ks @ Ks.T)
        W = (u.double() @ v.double()).requires_grad_(True)
        loss = ((W @ K - R) ** 2).sum() + 2.0 * torch.trace(W @ C @ W.T) + w * ((W @ Ks) ** 2).sum() + \
            0.5 * (W ** 2).sum()
        (grad,) = torch.autograd.grad(loss, W)
        assert grad.abs().max() < 1e-4 * W.abs().max()
        moved.append(float((W.detach() @ Ks).norm()))
    assert moved[0] > moved[1] > moved[2]


def _preserving(tokenizer, tmp_path, method: str, weight: float | None, **extra) -> dict:
    """A two-request edit of the tiny Llama with `preserve_from` (two other subjects) at `weight`."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("the colosseum is in rome\n\nwhich was built by people\n\n" * 20)
    kept = [{"prompt": "{} is located in the city of", "subject": s, "target_new": "x", "target_true": "y"} for s in ("the louvre",
                                                                                                 "the colosseum")]
    (tmp_path / "keep.json").write_text(json.dumps(kept))
    hp = {"v_steps": 4, "context_templates": []} | ({} if weight is None else {"preserve_scale": weight})
    return {"kind": "edit", "method": method, "model": "tiny", "layers": [1, 2], "requests": REQUESTS,
            "corpus": [str(corpus)], "mom2_tokens": 400, "hyperparameters": hp,
            **({} if weight is None else {"preserve_from": {"path": str(tmp_path / "keep.json")}}), **extra}


@pytest.mark.parametrize("method", ["memit", "alphaedit", "encore"])
def test_preserve_from_leaves_its_keys_alone_and_weight_zero_changes_nothing(tokenizer, tmp_path, method):
    """With `preserve_from`, the preserved subjects' keys (read by plain hooks) move less under the update as w
    grows; w = 0 gives the delta of no `preserve_from`, bit for bit; the model is unchanged afterwards."""
    from editors.methods.rome import EditRequest, compute_keys

    model = make_model("llama", len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain, _ = compute_edit(parse_spec(_preserving(tokenizer, tmp_path, method, None)), model, tokenizer)
    zero, _ = compute_edit(parse_spec(_preserving(tokenizer, tmp_path, method, 0.0)), model, tokenizer)
    assert all(torch.equal(plain.difference(n), zero.difference(n)) for n in plain.names)
    kept = [EditRequest("{} is located in the city of", s, "x") for s in ("the louvre", "the colosseum")]
    moved = []
    for w in (0.0, 10.0, 1000.0):
        delta, _ = compute_edit(parse_spec(_preserving(tokenizer, tmp_path, method, w)), model, tokenizer)
        moved.append(sum(float((delta.difference(n).double() @ compute_keys(model, tokenizer, layer, kept, ["{}"])
                                .double().T).norm()) for layer, n in zip((1, 2), delta.names)))
    assert moved[0] > moved[1] > moved[2]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_preserve_from_refuses_edited_subjects_and_other_methods(tokenizer, tmp_path):
    """A preserved subject that is also edited, and `preserve_from` on a method without layer objectives, are
    each one error naming `preserve_from`."""
    from interventions import SpecError

    body = _preserving(tokenizer, tmp_path, "memit", 1.0)
    (tmp_path / "keep.json").write_text(json.dumps([{"prompt": "{} is in", "subject": "big ben", "target_new": "x",
                                                         "target_true": "y"}]))
    with pytest.raises(SpecError, match="`preserve_from`.*not edited \\(1 are, e.g. 'big ben'\\)"):
        compute_edit(parse_spec(body), make_model("llama", len(tokenizer)), tokenizer)
    for method, where in (("ultraedit", {"layers": [1, 2]}), ("rome", {"layer": 1})):
        bad = {**body, "method": method, "hyperparameters": {}, **where}
        bad.pop("layers" if method == "rome" else "layer", None)
        with pytest.raises(SpecError, match="preserve_from"):
            parse_spec(bad)


def test_most_probable_early_stopping_stops_when_the_target_is_top1():
    """With `early_stop: mpes` a row stops as soon as `losses` reports its target most probable, though its NLL
    is still far above 0.05; with `nll` it runs on."""
    calls = {"n": 0}

    def losses(active):
        calls["n"] += 1
        state["most_probable"] = torch.tensor([calls["n"] >= 3])
        return (delta.sum() * 0 + torch.tensor([1.0])), torch.zeros(1)

    for stop, steps in (("mpes", 3), ("nll", 10)):
        calls["n"] = 0
        delta = torch.zeros(4, requires_grad=True)
        state = {"init": torch.ones(4)}
        hp = RomeHyperparameters(layer=0, v_steps=10, early_stop=stop)
        history = optimise_delta(delta, state, hp, losses)
        assert len(history) == steps, stop


def test_mpes_stops_the_target_search_no_later_than_nll(tokenizer):
    """On a (tiny) model: ENCORE's target search stops long before MEMIT's, while the NLL is still high
    (here 19 steps against 80, at an NLL above 2)."""
    from editors.methods.rome import compute_targets

    model = make_model("llama", len(tokenizer))
    requests = [EditRequest(r["prompt"], r["subject"], r["target_new"]) for r in REQUESTS]
    runs = {}
    for stop in ("nll", "mpes"):
        hp = RomeHyperparameters(layer=1, v_steps=80, v_lr=5.0, v_weight_decay=0.0, early_stop=stop,
                                 clamp_norm_factor=50.0, kl_factor=0.0)
        _, info = compute_targets(model, tokenizer, 1, requests, ["{}"], hp, site="block_output")
        runs[stop] = info["history"]
    assert len(runs["mpes"]) < len(runs["nll"])
    assert runs["mpes"][-1]["nll"] > 0.05          # stopped on the top-1 rule, not on the NLL


def _plain_keys_and_gradients(model, tokenizer, layer, requests):
    """Keys by a pre-hook and output gradients through a zero tensor added at the output: plain hooks."""
    module = model.model.layers[layer].mlp.down_proj
    keys, grads = [], []
    for r in requests:
        ids = tokenizer(r.prompt.replace("{}", r.subject))["input_ids"]
        target = tokenizer(r.target_new, add_special_tokens=False)["input_ids"]
        seq = torch.tensor([ids + target[:-1]])
        kept = {}
        zero = torch.zeros(1, seq.shape[1], module.out_features, requires_grad=True)
        h1 = module.register_forward_pre_hook(lambda m, a: kept.__setitem__("k", a[0].detach()))
        h2 = module.register_forward_hook(lambda m, a, out: out + zero)
        try:
            logp = model(input_ids=seq).logits[0].log_softmax(-1)
        finally:
            h1.remove()
            h2.remove()
        at = [len(ids) - 1 + j for j in range(len(target))]
        loss = -logp[at, target].mean()
        (g,) = torch.autograd.grad(loss, zero)
        keys.append(kept["k"][0, at])
        grads.append(g[0, at])
    return torch.cat(keys).double().numpy(), torch.cat(grads).double().numpy()


def _by_hand(K, G, lr, ridge, stats_K=None, stats_G=None):
    """ΔW = Vᵀ K (KᵀK + λI)⁻¹ with V = −η ‖k̂‖² ĝ per row, k̂ and ĝ standardised by the statistics of `stats_K`
    / `stats_G` (default: the batch itself) and the regression on the raw keys K."""
    stats_K = K if stats_K is None else stats_K
    stats_G = G if stats_G is None else stats_G
    Kn = (K - stats_K.mean(0)) / (stats_K.std(0) + 1e-6)
    Gn = (G - stats_G.mean(0)) / (stats_G.std(0) + 1e-6)
    V = -lr * (Kn ** 2).sum(1, keepdims=True) * Gn
    return V.T @ K @ np.linalg.inv(K.T @ K + ridge * np.eye(K.shape[1]))


def test_ultraedit_is_its_closed_form_with_lifelong_normalisation(tokenizer):
    """One batch: ΔW = Vᵀ K (KᵀK + λI)⁻¹, V = −η ‖k̂‖² ĝ, by its own statistics; a second batch is normalised
    by the statistics of both (the running sums). Computed here in NumPy (the primal form of the ridge solve,
    where Lesion uses the dual) from plain hooks' keys and gradients."""
    model = make_model("llama", len(tokenizer))
    hp = UltraEditHyperparameters(layers=(1, 2), lr=2.0, ridge=0.5)
    first = [EditRequest(r["prompt"], r["subject"], r["target_new"]) for r in REQUESTS]
    second = [EditRequest("{} is in the country of", "the colosseum", "france")]
    delta, info = compute_ultraedit(model, tokenizer, first, hp, base_model="t")
    later, _ = compute_ultraedit(model, tokenizer, second, hp, base_model="t", sums=info["sums"])
    for layer in (1, 2):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        K1, G1 = _plain_keys_and_gradients(model, tokenizer, layer, first)
        K2, G2 = _plain_keys_and_gradients(model, tokenizer, layer, second)
        np.testing.assert_allclose(delta.difference(name).double().numpy(), _by_hand(K1, G1, 2.0, 0.5),
                                   rtol=2e-3, atol=2e-5)
        want = _by_hand(K2, G2, 2.0, 0.5, np.concatenate([K1, K2]), np.concatenate([G1, G2]))
        assert not np.allclose(want, _by_hand(K2, G2, 2.0, 0.5))          # the running statistics matter
        np.testing.assert_allclose(later.difference(name).double().numpy(), want, rtol=2e-3, atol=2e-5)
        np.testing.assert_allclose(info["sums"][layer].numpy(), running_sums(torch.tensor(
            np.concatenate([K1, G1], 1))).numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["memit", "ultraedit", "r-rome"])
def test_the_update_norm_bound_holds(tokenizer, tmp_path, method):
    """`max_update_norm: b` scales each batch's change of each matrix to ‖ΔW‖ ≤ b‖W₀‖, keeping its direction."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("the colosseum is in rome\n\nwhich was built by people\n\n" * 20)
    where = {"layer": 1} if method == "r-rome" else {"layers": [1, 2]}
    hp = {"lr": 5.0} if method == "ultraedit" else {"v_steps": 8, "context_templates": []}
    requests = REQUESTS[:1] if method == "r-rome" else REQUESTS          # one batch each
    body = {"kind": "edit", "method": method, "model": "tiny", **where, "requests": requests,
            "corpus": [str(corpus)], "mom2_tokens": 400, "hyperparameters": hp}
    model = make_model("llama", len(tokenizer))
    free, _ = compute_edit(parse_spec(body), model, tokenizer)
    unbounded = relative_norms(model, free)
    bound = min(unbounded.values()) / 4
    body["hyperparameters"] = {**hp, "max_update_norm": bound}
    held, details = compute_edit(parse_spec(body), model, tokenizer)
    for name, rel in relative_norms(model, held).items():
        assert rel <= bound * (1 + 1e-5)
        a, b = free.difference(name).flatten(), held.difference(name).flatten()
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9999
    assert set(details[0]["bounded"]) == set(held.names)


CASES = [
    # (continuation, answer, rival, states it?)
    (" the city of Rome, in Italy.", " Rome", " Paris", True),
    (" Rome.", " Rome", None, True),
    (" ROME!", " Rome", None, True),
    (" Paris, not Rome.", " Rome", " Paris", False),          # the rival comes first
    (" Rome, not Paris.", " Rome", " Paris", True),
    (" a city. It is near Rome.", " Rome", None, False),      # not in the first sentence
    (" a small and very old town near Rome", " Rome", None, False),   # starts after the window
    (" Romeo and Juliet", " Rome", None, False),              # whole words only
    (" São Paulo is big", " Sao Paulo", None, True),          # accents dropped
    (" the United States of America", " United States", None, True),   # leading article of the text
    ("\nRome", " Rome", None, False),                         # an empty first line states nothing
    (" north america, mostly", " North America", None, True),
    (" the", " the", None, True),                             # an answer that is only an article keeps it
]


@pytest.mark.parametrize("continuation,answer,rival,expected", CASES)
def test_the_matching_rule_on_hand_written_cases(continuation, answer, rival, expected):
    assert states(continuation, answer, rival) is expected


def test_batched_greedy_continuations_equal_one_by_one(tokenizer):
    """Left padding changes nothing: each prompt continues as it does alone."""
    model = make_model("llama", len(tokenizer))
    prompts = ["the eiffel tower is in", "big ben", "the colosseum is located in the city of"]
    together = greedy_continuations(model, tokenizer, prompts, max_new_tokens=6)
    alone = [greedy_continuations(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone


def test_ultraedit_refuses_a_first_batch_it_cannot_standardise(tokenizer):
    """One answer token has no spread: its standardised features are all zero and the edit would do nothing.
    One `error:` line instead, and no weight changed."""
    from interventions import SpecError

    model = make_model("llama", len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one = [EditRequest("{} is located in the city of", "the eiffel tower", "rome")]
    assert len(tokenizer("rome", add_special_tokens=False)["input_ids"]) == 1
    with pytest.raises(SpecError, match="at least two answer tokens"):
        compute_ultraedit(model, tokenizer, one, UltraEditHyperparameters(layers=(1,)), base_model="t")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_full_rank_stack_is_kept_dense_and_equals_the_sum_of_its_parts(tokenizer):
    """Thousands of sequential edits would stack thousands of factor columns; once the rank reaches the
    matrix's smaller side the stacked change is kept dense instead, with the same value."""
    from editors.delta import Delta, stack

    model = make_model("llama", len(tokenizer))
    name = "model.layers.1.mlp.down_proj.weight"                    # [32, 64]
    g = torch.Generator().manual_seed(0)
    parts = [Delta.from_factors(model, {name: (torch.randn(32, 12, generator=g), torch.randn(12, 64, generator=g))},
                                method="t", base_model="t") for _ in range(3)]
    small = stack(model, parts[:2], compact=True, method="t", base_model="t")
    assert name in small.factors                                    # rank 24 < 32: still factors
    full = stack(model, [small, parts[2]], compact=True, method="t", base_model="t")
    assert name in full.dense and name not in full.factors         # rank 36 >= 32: dense
    want = sum(p.difference(name) for p in parts)
    torch.testing.assert_close(full.difference(name), want, rtol=1e-5, atol=1e-5)
    again = stack(model, [full, parts[0]], compact=True, method="t", base_model="t")
    torch.testing.assert_close(again.difference(name), want + parts[0].difference(name), rtol=1e-5, atol=1e-5)


def test_top1_tokens_batched_and_padded_equal_each_prompt_alone_and_the_plain_argmax(tokenizer):
    """Right padding in batches of 2 gives each prompt's own greedy token, the argmax of a plain forward."""
    from editors.evaluate import top1_accuracy, top1_tokens

    model = make_model("llama", len(tokenizer))
    prompts = ["the eiffel tower is in", "big ben", "the colosseum is located in the city of"]
    with torch.no_grad():
        plain = [int(model(**tokenizer(p, return_tensors="pt")).logits[0, -1].argmax()) for p in prompts]
    assert top1_tokens(model, tokenizer, prompts, batch=2) == plain
    first = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("paris", "rome")]
    answers = [tokenizer.decode([plain[0]]), tokenizer.decode([plain[1]]), "paris" if first[0] != plain[2] else "rome"]
    assert [tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in answers[:2]] == plain[:2]
    assert top1_accuracy(model, tokenizer, list(zip(prompts, answers)), batch=2) == pytest.approx(2 / 3)


def test_heldout_damage_counts_by_hand():
    """Of the facts answered before, the share kept, and of those lost the share now giving a new target."""
    from recipes.studies.heldout_damage import damage_by_relation

    relations = ["country", "country", "country", "country", "continent", "continent"]
    gold = [1, 2, 3, 4, 5, 6]
    before = [1, 2, 3, 9, 5, 6]            # the fourth fact was not known: it is left out
    after = [1, 7, 8, 4, 5, 6]             # two country facts lost, one to the new target 7
    assert damage_by_relation(relations, gold, before, after, {7}) == {
        "continent": {"known": 2, "kept": 1.0, "to_new_target": None},
        "country": {"known": 3, "kept": 1 / 3, "to_new_target": 0.5}}


def test_nas_rescales_each_value_to_the_anchor_and_leaves_outliers_unedited():
    """`anchored` against a hand computation: v* = v0 + (z - init) rescaled to the anchor's norm, or v0 (no
    edit: z' = init) where |v*| is over twice the anchor; `trimmed_mean` drops the largest 5%."""
    init = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    v0 = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    z = torch.tensor([[4.0, 3.0], [0.0, 2.0], [2.0, 12.0]])
    # v* = [3, 4] (norm 5), [1, 1] (norm √2), [0, 10] (norm 10 > 2 · 4.5: left at v0)
    out, skipped = anchored(z, init, v0, 4.5)
    expected = torch.tensor([[1.0 + 3 * 0.9, -1.0 + 4 * 0.9],
                             [-1.0 + 4.5 / 2 ** 0.5, 1.0 + 4.5 / 2 ** 0.5],
                             [2.0, 2.0]])
    assert skipped.tolist() == [False, False, True]
    torch.testing.assert_close(out, expected)
    assert trimmed_mean(torch.tensor([*range(1, 21), 100.0])) == 10.5          # ⌊0.05 · 21⌋ = 1 dropped
    assert trimmed_mean(torch.tensor([3.0, 5.0])) == 4.0                       # ⌊0.1⌋ = 0 dropped


def _mlp_values(model, tokenizer, layer, requests):
    """The MLP's output at each request's subject-last token on its plain prompt, by a plain forward hook."""
    seen = []
    handle = model.model.layers[layer].mlp.register_forward_hook(lambda m, a, out: seen.append(out[0]))
    try:
        for r in requests:
            ids = tokenizer(r.prompt.split("{}")[0] + r.subject, add_special_tokens=False)["input_ids"]
            full = tokenizer(r.text()[0], add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                model(input_ids=torch.tensor([full]))
            seen[-1] = seen[-1][len(ids) - 1]
    finally:
        handle.remove()
    return torch.stack(seen)


def test_nas_edits_land_on_values_of_the_anchors_norm(tokenizer):
    """MEMIT with λ → 0 and C = I on one layer maps its targets exactly, so after the edit the MLP's value at
    each subject (read by a plain hook) is v*. Without NAS those values' mean norm is the anchor NAS takes from
    the same requests on the unedited model; with NAS each value keeps its direction and has the anchor's norm."""
    from editors.methods.memit import compute_memit, value_anchor
    from interventions.spec import MemitHyperparameters

    requests = [EditRequest(r["prompt"], r["subject"], r["target_new"], r["target_true"]) for r in REQUESTS]
    model = make_model("llama", len(tokenizer))
    hp = MemitHyperparameters(layers=(2,), v_steps=15, context_templates=(), mom2_update_weight=1e-6)
    C = {2: torch.eye(64)}
    plain, _ = compute_memit(model, tokenizer, requests, hp, base_model="tiny", C=C)
    with applied(model, plain):
        free = _mlp_values(model, tokenizer, 2, requests)
    anchor = value_anchor(model, tokenizer, requests, hp, ["{}"])
    torch.testing.assert_close(anchor, float(free.norm(dim=1).mean()), rtol=1e-3, atol=0)
    held, details = compute_memit(model, tokenizer, requests, hp, base_model="tiny", C=C, anchor=anchor)
    with applied(model, held):
        scaled = _mlp_values(model, tokenizer, 2, requests)
    assert details["anchor_skipped"] == 0
    torch.testing.assert_close(scaled.norm(dim=1), torch.full((2,), anchor), rtol=1e-3, atol=0)
    torch.testing.assert_close(scaled, free * (anchor / free.norm(dim=1, keepdim=True)), rtol=1e-3, atol=1e-3)


def test_norm_anchor_is_recorded_and_refused_where_it_cannot_work(tokenizer, tmp_path):
    """A spec with `norm_anchor` records the anchor and the requests it left unedited in each batch's details;
    on a model whose MLP output passes a norm (Gemma 3), and on a method without targets, it is one error."""
    from interventions import SpecError

    corpus = tmp_path / "c.txt"
    corpus.write_text("the colosseum is in rome\n\nwhich was built by people\n\n" * 20)
    body = {"kind": "edit", "method": "alphaedit", "model": "tiny", "layers": [1, 2], "requests": REQUESTS,
            "corpus": [str(corpus)], "mom2_tokens": 400, "sequential": {"batch_size": 1},
            "hyperparameters": {"v_steps": 8, "context_templates": [], "norm_anchor": 2}}
    _, details = compute_edit(parse_spec(body), make_model("llama", len(tokenizer)), tokenizer)
    assert len(details) == 2 and all(d["anchor"] == details[0]["anchor"] > 0 for d in details)
    assert all(d["anchor_skipped"] in (0, 1) for d in details)
    with pytest.raises(SpecError, match="hyperparameters.norm_anchor.*gemma3"):
        compute_edit(parse_spec(body), make_model("gemma3", len(tokenizer)), tokenizer)
    with pytest.raises(SpecError, match="norm_anchor"):
        parse_spec({**body, "method": "ultraedit", "hyperparameters": {"norm_anchor": 2}})
