"""Steering vectors on tiny seeded models, against plain PyTorch hooks and hand computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from interventions import SpecError, parse_spec
from interventions.lenses.steering import (
    Steerer,
    SteerError,
    SteeringVector,
    estimate,
    first_direction,
    load_vector,
    steering,
)
from support.models import make_model
from support.reference import hooks, module

POS = ["the eiffel tower is in paris", "the colosseum is in rome", "big ben is in london", "paris is famous"]
NEG = ["the statue of liberty is in new york", "a city which was built by people", "new york is great",
       "the old city"]
PROMPTS = ["the eiffel tower is located in", "big ben", "where is the colosseum"]
FAMILY_SITE = {"block_output": "block_output", "mlp_output": "mlp_output"}


def reference_states(model, family, tokenizer, texts, layer, site, read):
    """One unpadded forward per text, plain forward hook on the module."""
    out = []
    for text in texts:
        kept = {}
        with hooks([(module(model, family, site, layer), lambda t: kept.__setitem__("s", t[0].clone()), False)]):
            with torch.no_grad():
                model(torch.tensor([tokenizer(text)["input_ids"]]))
        out.append(kept["s"][-1] if read == "last" else kept["s"].mean(0))
    return torch.stack(out)


@pytest.mark.parametrize("read", ["last", "mean"])
@pytest.mark.parametrize("site", ["block_output", "mlp_output"])
def test_mean_diff_equals_plain_hooks(tiny, read, site):
    family, model, tokenizer = tiny
    v = estimate(model, tokenizer, POS, NEG[:3], layers=[1, 3], site=site, read=read)
    for layer in (1, 3):
        want = (reference_states(model, family, tokenizer, POS, layer, site, read).mean(0)
                - reference_states(model, family, tokenizer, NEG[:3], layer, site, read).mean(0))
        torch.testing.assert_close(v.vectors[layer], want, atol=1e-5, rtol=1e-5)
    assert v.meta["norms"]["1"] == pytest.approx(float(v.vectors[1].norm()))


def test_pca_equals_an_eigendecomposition(tiny_llama):
    model, tokenizer = tiny_llama
    v = estimate(model, tokenizer, POS, NEG, layers=[2], method="pca")
    d = (reference_states(model, "llama", tokenizer, POS, 2, "block_output", "last")
         - reference_states(model, "llama", tokenizer, NEG, 2, "block_output", "last")).double().numpy()
    values, vectors = np.linalg.eigh(d.T @ d)                 # uncentred second moment of the differences
    top = vectors[:, -1]
    top = top if (d @ top).mean() > 0 else -top
    want = top * (d @ top).mean()
    np.testing.assert_allclose(v.vectors[2].numpy(), want, atol=1e-4, rtol=1e-4)


def test_first_direction_by_hand():
    diffs = torch.tensor([[2.0, 0.0], [4.0, 0.0], [3.0, 0.0]])       # all along +x, mean projection 3
    torch.testing.assert_close(first_direction(diffs), torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(first_direction(-diffs), torch.tensor([-3.0, 0.0]))


def hook_generate(model, family, tokenizer, prompt, vector, coef, apply_to, n):
    """HF `generate`, greedy, one unpadded prompt, with a forward hook adding coef·v: on the prompt
    call (more than one position), on the one-token decoding calls, or on both."""
    layer = vector.layers[0]
    v = vector.vectors[layer]

    def add(t):
        prompt_call = t.shape[1] > 1
        if apply_to == "all" or (apply_to == "prompt") == prompt_call:
            t += coef * v

    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with hooks([(module(model, family, vector.site, layer), add, False)]), torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("apply_to", ["all", "prompt", "generated"])
def test_steered_generation_equals_a_plain_hook_reference(tiny, apply_to):
    """Batched, left-padded, several coefficients in one batch = one hooked `generate` per row."""
    family, model, tokenizer = tiny
    vector = estimate(model, tokenizer, POS, NEG, layers=[1])
    coefs = [0.0, 1.0, 3.0]
    rows = [(p, c) for c in coefs for p in PROMPTS]
    with steering(model, tokenizer, vector, apply_to=apply_to) as steer:
        got = steer.generate_ids([p for p, _ in rows], coefs=[c for _, c in rows], max_new_tokens=6)
    want = [hook_generate(model, family, tokenizer, p, vector, c, apply_to, 6) for p, c in rows]
    assert got == want
    plain = [hook_generate(model, family, tokenizer, p, vector, 0.0, apply_to, 6) for p in PROMPTS]
    assert got[: len(PROMPTS)] == plain                                 # coefficient 0 = unsteered
    assert got[len(PROMPTS):] != plain * 2                              # and steering did change something


def test_zero_coefficient_is_bit_exact(tiny_llama):
    model, tokenizer = tiny_llama
    vector = estimate(model, tokenizer, POS, NEG, layers=[0, 2])
    steer = Steerer(model, tokenizer, vector)
    ids = torch.tensor([tokenizer("the eiffel tower is in")["input_ids"]] * 2)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    with torch.no_grad():
        plain = model(**inputs).logits
        steered = steer.forward(inputs, torch.tensor([0.0, 5.0]), torch.ones(2, ids.shape[1])).logits
    assert torch.equal(steered[0], plain[0]) and not torch.allclose(steered[1], plain[1])


def test_continuation_logprobs_equal_plain_hooks(tiny_llama):
    model, tokenizer = tiny_llama
    vector = estimate(model, tokenizer, POS, NEG, layers=[1])
    v = vector.vectors[1]
    for apply_to in ("all", "prompt", "generated"):
        got = Steerer(model, tokenizer, vector, apply_to=apply_to).continuation_logprobs(
            PROMPTS, "paris france", [2.0] * len(PROMPTS))
        for prompt, value in zip(PROMPTS, got):
            p = tokenizer(prompt)["input_ids"]
            t = tokenizer("paris france", add_special_tokens=False)["input_ids"]
            sel = {"all": slice(None), "prompt": slice(0, len(p)), "generated": slice(len(p), None)}[apply_to]

            def add(x, sel=sel):
                x[:, sel] += 2.0 * v

            with hooks([(module(model, "llama", "block_output", 1), add, False)]), torch.no_grad():
                logits = model(torch.tensor([p + t])).logits[0]
            lp = logits[len(p) - 1: len(p) - 1 + len(t)].log_softmax(-1)[torch.arange(len(t)), torch.tensor(t)]
            assert value == pytest.approx(float(lp.mean()), abs=1e-5)


def test_vector_file_round_trip_and_refusals(tiny_llama, tmp_path, tokenizer):
    model, _ = tiny_llama
    vector = estimate(model, tokenizer, POS, NEG, layers=[1, 3], method="pca", model_name="tiny")
    path = vector.save(tmp_path / "v.safetensors")
    back = load_vector(path)
    assert back.meta == vector.meta and back.layers == [1, 3]
    assert all(torch.equal(back.vectors[l], vector.vectors[l]) for l in (1, 3))
    assert back.meta["method"] == "pca" and back.meta["pairs"] == 4 and len(back.meta["prompts_sha256"]) == 64
    assert not list(tmp_path.glob(".*"))                                  # no temporary left behind

    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:-7])
    with pytest.raises(SteerError, match="not a readable safetensors file"):
        load_vector(tmp_path / "cut.safetensors")
    with pytest.raises(SteerError, match="expected an existing vector file"):
        load_vector(tmp_path / "missing.safetensors")
    gpt2 = make_model("gpt2", len(tokenizer))
    wide = SteeringVector({1: torch.zeros(48)}, dict(vector.meta, layers=[1]))
    with pytest.raises(SteerError, match="48 dims but this model's hidden size is 32"):
        Steerer(gpt2, tokenizer, wide)
    deep = SteeringVector({9: torch.zeros(32)}, dict(vector.meta, layers=[9]))
    with pytest.raises(SteerError, match=r"layers \[9\] do not exist"):
        Steerer(gpt2, tokenizer, deep)


STEER = {"kind": "steer", "pairs": [{"positive": p, "negative": n} for p, n in zip(POS, NEG)], "layers": [1],
         "prompts": PROMPTS, "lexicon": ["paris", "rome"]}


def test_steer_spec_validation_and_round_trip():
    from interventions.spec import dump_spec, load_yaml

    spec = parse_spec(STEER)
    assert parse_spec(load_yaml(dump_spec(spec))) == spec
    assert spec.contrast() == (POS, NEG)
    with pytest.raises(SpecError, match="either `pairs` or `positive`"):
        parse_spec(dict(STEER, positive=POS, negative=NEG))
    with pytest.raises(SpecError, match="`method: pca` needs paired prompts"):
        parse_spec(dict(STEER, pairs=[], positive=POS, negative=NEG[:2], method="pca"))
    with pytest.raises(SpecError, match="give a metric"):
        parse_spec(dict(STEER, lexicon=[]))
    with pytest.raises(SpecError, match="`apply_to`"):
        parse_spec(dict(STEER, apply_to="everywhere"))
    with pytest.raises(SpecError, match="`site`"):
        parse_spec(dict(STEER, site="mlp_key"))
    with pytest.raises(SpecError, match="needs `temperature`"):
        parse_spec(dict(STEER, samples=3))
    with pytest.raises(SpecError, match="`deltas` .*and/or `steer`"):
        parse_spec({"kind": "apply", "prompts": ["x"]})


def test_steer_run_and_apply_end_to_end(tmp_path, tokenizer, capsys):
    """`lesion run` on a steer spec writes the vector, generations, table and plot; `lesion apply
    --steer` generates with the saved vector; coefficient 0 reproduces the unsteered text."""
    from recipes.cli import main

    model = make_model("llama", len(tokenizer))
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    spec = tmp_path / "steer.yaml"
    spec.write_text(json.dumps(dict(STEER, model=str(tmp_path / "tiny"), coefficients=[0, 2, 6],
                                    targets=["paris"], max_new_tokens=5)))
    assert main(["run", str(spec), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| coef | lexicon_share | logprob[paris] |" in out and "lexicon_share: " in out
    for name in ("vector.safetensors", "generations.jsonl", "results.json", "table.md", "steer.png", "spec.yaml"):
        assert (tmp_path / "out" / name).is_file(), name
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["coef"] for r in report["table"]] == [0, 2, 6]
    gens = [json.loads(line) for line in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 3 * len(PROMPTS)
    for g in gens:
        words = g["text"].split()
        want = sum(w in ("paris", "rome") for w in words) / len(words) if words else None
        assert g["lexicon_share"] == want
    vector = load_vector(tmp_path / "out" / "vector.safetensors")
    assert vector.meta["spec"]["layers"] == [1] and vector.meta["model"] == str(tmp_path / "tiny")
    with torch.no_grad():
        ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=5,
                               pad_token_id=0)[0, ids.shape[1]:]
    assert gens[0]["coef"] == 0 and gens[0]["text"] == tokenizer.decode(plain, skip_special_tokens=True)

    assert main(["apply", "--model", str(tmp_path / "tiny"), "--steer", str(tmp_path / "out" / "vector.safetensors"),
                 "--coef", "6", "--prompt", PROMPTS[0], "--max-new-tokens", "5"]) == 0
    applied = capsys.readouterr().out
    six = next(g for g in gens if g["coef"] == 6 and g["prompt"] == PROMPTS[0])
    assert f"steered x6: {six['text']!r}" in applied
    assert main(["apply", "--model", str(tmp_path / "tiny"), "--steer", str(tmp_path / "nope.safetensors"),
                 "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "`steer`" in err and "expected an existing file" in err and "Loading weights" not in err   # before the load


def test_end_of_sequence_and_min_new_tokens_match_generate(tokenizer):
    """With an end-of-sequence token the model emits, our loop stops (and pads) where `generate`
    does, and `min_new_tokens` suppresses it as `generate` does."""
    model = make_model("llama", len(tokenizer))
    vector = estimate(model, tokenizer, POS, NEG, layers=[1])
    steer = Steerer(model, tokenizer, vector, coef=0.0)
    first = steer.generate_ids(PROMPTS, max_new_tokens=6)
    model.generation_config.eos_token_id = first[0][2]            # the 3rd token of row 0 ends it
    for min_new in (0, 4):
        got = steer.generate_ids(PROMPTS, max_new_tokens=6, min_new_tokens=min_new)
        for prompt, row in zip(PROMPTS, got):
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            with torch.no_grad():
                want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                                      min_new_tokens=min_new, pad_token_id=0)[0, ids.shape[1]:].tolist()
            assert row == want
    assert len(steer.generate_ids(PROMPTS[:1], max_new_tokens=6)[0]) == 3


def test_bench_steer_runs(tmp_path, tokenizer, capsys):
    """The benchmark command on a tiny model: all three rows, ratios computed (no timing asserted)."""
    from recipes.cli import main

    model = make_model("llama", len(tokenizer))
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    estimate(model, tokenizer, POS, NEG, layers=[1]).save(tmp_path / "v.safetensors")
    assert main(["bench-steer", "--model", str(tmp_path / "tiny"), "--vector", str(tmp_path / "v.safetensors"),
                 "--batch", "3", "--new-tokens", "4", "--repeats", "1", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "| plain generate |" in out and "| Lesion, steered (coef 4) |" in out
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["ratio_steered_to_plain"] > 0 and len(report["median_tokens_per_s"]) == 3


def test_sampling_is_per_row_and_independent_of_the_batch(tiny_llama):
    """A sampled row depends on (seed, prompt, sample index) only: the same alone as in a larger batch,
    and different for another sample index or seed."""
    model, tokenizer = tiny_llama
    steer = Steerer(model, tokenizer, estimate(model, tokenizer, POS, NEG, layers=[1]), coef=1.0)
    kw = {"max_new_tokens": 8, "temperature": 1.5}
    batch = steer.generate_ids(PROMPTS * 2, sample_ids=[0, 0, 0, 1, 1, 1], seed=5, **kw)
    alone = steer.generate_ids(PROMPTS[1:2], sample_ids=[1], seed=5, **kw)
    assert batch[4] == alone[0]
    assert batch[:3] != batch[3:]
    assert steer.generate_ids(PROMPTS[1:2], sample_ids=[1], seed=6, **kw) != alone


@pytest.mark.parametrize("read", ["last", "mean"])
def test_a_feature_vector_is_its_decoder_row_times_its_activation_difference(tiny_llama, read):
    from support.models import random_dictionary

    model, tokenizer = tiny_llama
    d = random_dictionary("standard", layer=2)
    v = estimate(model, tokenizer, POS, NEG, layers=[2], read=read, method="feature", dictionary=d)
    P, N = (reference_states(model, "llama", tokenizer, texts, 2, "block_output", read) for texts in (POS, NEG))
    pre = lambda x: ((x - d.b_dec) @ d.W_enc + d.b_enc).relu()          # the dictionary's ReLU encoder, by hand
    diff = pre(P).mean(0) - pre(N).mean(0)
    f = int(diff.argmax())
    assert v.meta["feature"] == f and v.meta["activation_difference"] == pytest.approx(float(diff[f]), abs=1e-5)
    torch.testing.assert_close(v.vectors[2], (d.W_dec[f] * diff[f]).detach(), atol=1e-5, rtol=1e-5)
    named = estimate(model, tokenizer, POS, NEG, layers=[2], read=read, method="feature", dictionary=d, feature=5)
    torch.testing.assert_close(named.vectors[2], (d.W_dec[5] * diff[5]).detach(), atol=1e-5, rtol=1e-5)


def test_a_feature_steer_spec_is_checked_against_its_dictionary(tmp_path, tokenizer, capsys):
    from recipes.cli import main
    from support.models import random_dictionary

    model = make_model("llama", len(tokenizer))
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    random_dictionary("standard", layer=2).save(tmp_path / "sae")
    base = dict(STEER, model=str(tmp_path / "tiny"), coefficients=[0, 1], max_new_tokens=3, method="feature",
                dictionary=str(tmp_path / "sae"), layers=[2])
    with pytest.raises(SpecError, match="`method: feature` takes a `dictionary`"):
        parse_spec(dict(STEER, feature=3))
    with pytest.raises(SpecError, match="the dictionary's one layer"):
        parse_spec(dict(base, layers=[1, 2]))
    for change, field in (({"layers": [1]}, "`layers`"), ({"feature": 64}, "`feature`")):
        (tmp_path / "bad.yaml").write_text(json.dumps(dict(base, **change)))
        assert main(["validate", str(tmp_path / "bad.yaml"), "--compile"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {field}")
    (tmp_path / "steer.yaml").write_text(json.dumps(base))
    assert main(["run", str(tmp_path / "steer.yaml"), "--out", str(tmp_path / "out")]) == 0
    vector = load_vector(tmp_path / "out" / "vector.safetensors")
    assert vector.meta["method"] == "feature" and vector.layers == [2] and "feature" in vector.meta


def test_matched_fluency_picks_the_best_lexicon_share_within_the_budget():
    from recipes.studies.steer_features import best_within

    rows = [{"coef": 0.0, "lexicon_share": 0.0, "unsteered_nll": 2.0, "entropy": 5.0, "example": "a"},
            {"coef": 1.0, "lexicon_share": 0.2, "unsteered_nll": 2.5, "entropy": 4.8, "example": "b"},
            {"coef": 2.0, "lexicon_share": 0.5, "unsteered_nll": 3.5, "entropy": 4.9, "example": "c"},   # NLL over
            {"coef": 4.0, "lexicon_share": 0.6, "unsteered_nll": 2.9, "entropy": 4.0, "example": "d"}]   # entropy under
    assert best_within(rows, 1.0)["coef"] == 1.0 and best_within(rows, 2.0)["coef"] == 2.0
