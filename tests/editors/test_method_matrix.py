"""Every edit method through one matrix of invariants, on a tiny seeded Llama (the methods' own
closed-form checks are in test_rome.py, test_memit.py and test_edit_methods.py):

- computing an edit leaves the model bit for bit as it was (ROME's `execute_rome` invariant);
- the Delta changes exactly the method's matrices (its layers' MLP output projections);
- each edited matrix's change has rank at most the number of requests;
- apply then revert is bit-exact, and applying the saved file equals applying the Delta in memory;
- the Delta records its method and the hyperparameters the run used;
- the edit raises p(target_new) on the edit prompt.
"""

from __future__ import annotations

import pytest
import torch

from editors.delta import apply, load_delta, revert
from editors.editor import compute_edit, hyperparameters
from interventions import parse_spec
from interventions.spec import EDIT_METHODS, ONE_LAYER_METHODS
from support.models import make_model

REQUESTS = [{"prompt": "{} is located in the city of", "subject": "the eiffel tower", "target_new": "rome",
             "target_true": "paris"},
            {"prompt": "{} is located in the city of", "subject": "big ben", "target_new": "paris",
             "target_true": "london"}]
#: Text for the key statistics C that never names the edited subjects: AlphaEdit projects its update onto
#: C's null space, so a corpus holding the subjects' own keys would leave it nothing to change (with the
#: subjects in the corpus, p(" rome") stays at 0.0024 under AlphaEdit while MEMIT moves it).
CORPUS = "the colosseum is in rome\n\nthe statue of liberty is in new york\n\nwhich was built by people\n\n" * 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return str(path)


def spec_for(method: str, corpus: str):
    where = {"layer": 1} if method in ONE_LAYER_METHODS else {"layers": [1, 2]}
    requests = REQUESTS[:1] if method in ("rome", "r-rome") else REQUESTS
    hp = {"lr": 5.0} if method == "ultraedit" else {"v_steps": 12, "context_templates": []}
    if method in ("memit", "encore"):
        hp["v_steps"] = 25      # MEMIT's own count: after 12 its targets still lower p(new) here (0.0024 -> 0.0011)
    return parse_spec({"kind": "edit", "method": method, "model": "tiny", **where, "requests": requests,
                       "corpus": [corpus], "mom2_tokens": 400, "hyperparameters": hp})


@pytest.fixture(scope="module", params=sorted(EDIT_METHODS))
def edited(request, tokenizer, corpus, tmp_path_factory):
    model = make_model("llama", len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = spec_for(request.param, corpus)
    delta, _ = compute_edit(spec, model, tokenizer)
    path = delta.save(tmp_path_factory.mktemp(request.param) / "delta.safetensors")
    return request.param, spec, model, before, delta, path


def test_computing_leaves_the_model_unchanged(edited):
    _, _, model, before, _, _ = edited
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_delta_changes_exactly_the_methods_matrices(edited):
    method, spec, _, _, delta, _ = edited
    assert delta.names == [f"model.layers.{layer}.mlp.down_proj.weight" for layer in spec.edit_layers]


def test_each_change_has_rank_at_most_the_requests(edited, tokenizer):
    """One key per request; UltraEdit's keys are the answer tokens, one per token of each target."""
    method, spec, model, before, delta, _ = edited
    keys = sum(len(tokenizer(r.target_new, add_special_tokens=False)["input_ids"]) for r in spec.requests) \
        if method == "ultraedit" else len(spec.requests)
    for name in delta.names:
        u, v = delta.factors[name]
        change = (u @ v).double()
        assert torch.linalg.matrix_rank(change, rtol=1e-6) <= keys


def test_apply_then_revert_is_bit_exact_and_the_file_equals_memory(edited):
    _, _, model, before, delta, path = edited
    apply(model, delta)
    in_memory = {k: v.clone() for k, v in model.state_dict().items()}
    revert(model, delta)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    loaded = load_delta(path)
    apply(model, loaded)
    try:
        assert all(torch.equal(v, in_memory[k]) for k, v in model.state_dict().items())
    finally:
        revert(model, loaded)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_delta_records_its_method_and_hyperparameters(edited):
    method, spec, _, _, delta, _ = edited
    assert delta.meta["method"] == method
    assert delta.meta["hyperparameters"] == hyperparameters(spec).recorded()


def test_the_edit_raises_the_new_targets_probability(edited, tokenizer):
    _, spec, model, _, delta, _ = edited
    request = spec.requests[0]
    ids = tokenizer(request.prompt.format(request.subject), return_tensors="pt")["input_ids"]
    target = tokenizer(request.target_new, add_special_tokens=False)["input_ids"][0]

    def p_new():
        with torch.no_grad():
            return model(input_ids=ids).logits[0, -1].softmax(-1)[target].item()

    base = p_new()
    apply(model, delta)
    try:
        assert p_new() > base
    finally:
        revert(model, delta)
