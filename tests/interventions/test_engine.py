"""The batched pyvene engine against the plain-hook reference, and its invariances."""

from __future__ import annotations

import pytest
import torch

from interventions import compile_spec, parse_spec, run, run_plan
from support import reference as ref

TOL = 1e-5
EIFFEL = {"prompt": "the eiffel tower is located in the city of", "subject": "eiffel tower"}
COLOSSEUM = {"prompt": "the colosseum is in the city of", "subject": "colosseum"}


def trace_spec(**kw):
    data = {"kind": "trace", "model": "tiny", "prompts": [EIFFEL, COLOSSEUM], "samples": 3, "seed": 7,
            "window": 3, "max_batch_rows": 17}
    data.update(kw)
    return parse_spec(data)


def words(tokenizer, text):
    return tokenizer(text)["input_ids"]


def subject_positions(text, subject):
    """Independent of the tokenizer's offsets: the word tokenizer gives one token per word."""
    w, s = text.split(), subject.split()
    start = next(i for i in range(len(w)) if w[i:i + len(s)] == s)
    return list(range(start, start + len(s)))


def expected_trace(model, family, tokenizer, spec, plan, i, grid, site, window_size):
    p = spec.prompts[i]
    ids = words(tokenizer, p.prompt)
    subj = subject_positions(p.prompt, p.subject)
    clean = ref.capture(model, family, ids, site)
    answer = int(ref.last_logits(model, family, torch.tensor([ids]))[0].argmax())
    if spec.corruption == "noise":
        noise = plan.noise[i]
        batch = torch.tensor([ids] * noise.shape[0])
    else:
        noise = None
        batch = torch.tensor([words(tokenizer, p.prompt.replace(p.subject, p.counterfactual_subject))])
    n = ref.num_layers(model, family)

    def prob(restores):
        logits = ref.last_logits(model, family, batch, noise=noise, subject=subj, restores=restores)
        return float(logits.softmax(-1)[:, answer].mean())

    corrupted = prob(())
    out = torch.zeros(n, len(ids))
    for layer in range(n):
        for pos in range(len(ids)):
            layers = [layer] if grid == "hidden" else ref.window(layer, window_size, n)
            out[layer, pos] = prob([(site, l, [pos], clean[l]) for l in layers])
    return out, corrupted, answer


@pytest.mark.parametrize("corruption", ["noise", "swap"])
def test_trace_equals_plain_hook_reference(tiny, corruption):
    family, model, tokenizer = tiny
    prompts = [dict(EIFFEL, counterfactual_subject="big ben"), dict(COLOSSEUM, counterfactual_subject="paris")]
    spec = trace_spec(corruption=corruption, prompts=prompts)
    plan = compile_spec(spec, model, tokenizer)
    result = run_plan(plan)
    sites = {"hidden": "block_output", "mlp": "mlp_output", "attention": "attention_output"}
    spread = []
    for i in range(2):
        for grid, site in sites.items():
            want, corrupted, answer = expected_trace(model, family, tokenizer, spec, plan, i, grid, site, 3)
            got = result.grids[grid].values[i, :, :want.shape[1]]
            assert (got - want).abs().max() <= TOL, (grid, i, got, want)
            assert result.prompts[i]["corrupted_prob"] == pytest.approx(corrupted, abs=TOL)
            assert result.prompts[i]["answer_id"] == answer
            spread.append(float(want.max() - want.min()))
    # The comparison only means something if the interventions move the metric a lot.
    assert max(spread) > 0.05


def test_noise_is_seeded_scaled_and_independent_of_other_prompts(tiny_llama):
    model, tokenizer = tiny_llama
    a = compile_spec(trace_spec(sigma=0.5, samples=200), model, tokenizer)
    b = compile_spec(trace_spec(sigma=0.5, samples=200, prompts=[COLOSSEUM]), model, tokenizer)
    c = compile_spec(trace_spec(sigma=0.5, samples=200, seed=8), model, tokenizer)
    assert torch.equal(a.noise[1], b.noise[0])          # same prompt, same seed -> same noise
    assert not torch.equal(a.noise[1], c.noise[1])      # another seed -> other noise
    assert float(a.noise[0].std()) == pytest.approx(3.0 * 0.5, rel=0.05)


def test_sigma_is_std_of_subject_embeddings(tiny_llama):
    model, tokenizer = tiny_llama
    plan = compile_spec(trace_spec(), model, tokenizer)
    emb = model.model.embed_tokens.weight
    rows = [emb[tokenizer.convert_tokens_to_ids(w)] for w in ("eiffel", "tower", "colosseum")]
    assert plan.sigma == pytest.approx(float(torch.stack(rows).detach().std()), rel=1e-6)


def test_subject_column_restores_all_subject_tokens_together(tiny_llama):
    model, tokenizer = tiny_llama
    spec = trace_spec(prompts=[EIFFEL], positions=["subject", "subject_last", -1], sites=["hidden"])
    plan = compile_spec(spec, model, tokenizer)
    result = run_plan(plan)
    ids = words(tokenizer, EIFFEL["prompt"])
    clean = ref.capture(model, "llama", ids, "block_output")
    answer = result.prompts[0]["answer_id"]
    batch = torch.tensor([ids] * 3)
    for li in range(4):
        for col, pos in enumerate(([1, 2], [2], [len(ids) - 1])):
            logits = ref.last_logits(model, "llama", batch, noise=plan.noise[0], subject=[1, 2],
                                     restores=[("block_output", li, pos, clean[li])])
            want = float(logits.softmax(-1)[:, answer].mean())
            assert abs(float(result.grids["hidden"].values[0, li, col]) - want) <= TOL
    assert result.prompts[0]["columns"] == ["subject", "subject_last", "-1"]


PATCH_SITES = ["embed", "block_input", "block_output", "mlp_output", "attention_output", "mlp_key"]


@pytest.mark.parametrize("metric", ["prob", "logit_diff", "kl"])
def test_patch_equals_plain_hook_reference(tiny, metric):
    family, model, tokenizer = tiny
    prompts = [{"base": "the colosseum is located in the city of", "source": "the eiffel tower is in the city of",
                "subject": "colosseum"},
               {"base": "big ben is in london", "source": "the colosseum is in rome", "target": "rome"}]
    spec = parse_spec({"kind": "patch", "model": "tiny", "prompts": prompts, "sites": PATCH_SITES,
                       "metric": metric, "positions": ["all"], "max_batch_rows": 13})
    result = run(spec, model, tokenizer)
    for i, p in enumerate(prompts):
        base, source = words(tokenizer, p["base"]), words(tokenizer, p["source"])
        src_logits = ref.last_logits(model, family, torch.tensor([source]))[0]
        base_logits = ref.last_logits(model, family, torch.tensor([base]))[0]
        target = tokenizer.convert_tokens_to_ids(p["target"]) if "target" in p else int(src_logits.argmax())
        cf = int(base_logits.argmax())
        assert result.prompts[i]["answer_id"] == target and result.prompts[i]["counterfactual_id"] == cf

        def metric_of(logits):
            if metric == "prob":
                return float(logits.softmax(-1)[target])
            if metric == "logit_diff":
                return float(logits[target] - logits[cf])
            ls, lp = src_logits.log_softmax(-1), logits.log_softmax(-1)
            return float((ls.exp() * (ls - lp)).sum())

        assert result.prompts[i]["base_metric"] == pytest.approx(metric_of(base_logits), abs=TOL)
        for site in PATCH_SITES:
            clean = ref.capture(model, family, source, site)
            layers = [None] if site == "embed" else list(range(ref.num_layers(model, family)))
            for li, layer in enumerate(layers):
                for pos in range(len(base)):
                    logits = ref.last_logits(model, family, torch.tensor([base]),
                                             restores=[(site, layer, [pos], clean[layer])])[0]
                    got = float(result.grids[site].values[i, li, pos])
                    assert abs(got - metric_of(logits)) <= max(TOL, 1e-5 * abs(metric_of(logits))), \
                        (site, layer, pos)


def test_batched_equals_sequential_and_chunk_size_does_not_matter(tiny):
    family, model, tokenizer = tiny
    results = [run(trace_spec(max_batch_rows=n), model, tokenizer) for n in (1, 5, 1000)]
    for other in results[1:]:
        for name, grid in results[0].grids.items():
            assert torch.allclose(grid.values, other.grids[name].values, atol=TOL, equal_nan=True)


def test_padded_equals_unpadded(tiny):
    """The short prompt alone (no padding) equals the same prompt batched beside a longer one."""
    family, model, tokenizer = tiny
    # sigma is given: by default it is measured over all prompts' subjects, so it would differ
    both = run(trace_spec(sigma=0.4), model, tokenizer)
    alone = run(trace_spec(sigma=0.4, prompts=[COLOSSEUM]), model, tokenizer)
    n = alone.grids["hidden"].lengths[0]
    for name in both.grids:
        assert torch.allclose(both.grids[name].values[1, :, :n], alone.grids[name].values[0], atol=TOL)
    assert both.prompts[1]["corrupted_prob"] == pytest.approx(alone.prompts[0]["corrupted_prob"], abs=TOL)


def test_layers_subset_and_window_edges(tiny_llama):
    model, tokenizer = tiny_llama
    full = run(trace_spec(), model, tokenizer)
    part = run(trace_spec(layers=[-1, 0]), model, tokenizer)
    assert part.grids["mlp"].layers == [0, 3]
    for name in full.grids:
        assert torch.allclose(part.grids[name].values[:, 0], full.grids[name].values[:, 0], atol=TOL, equal_nan=True)
        assert torch.allclose(part.grids[name].values[:, 1], full.grids[name].values[:, 3], atol=TOL, equal_nan=True)


def _mlp_tokens(model):
    """Record the row × token count of every MLP call (inside the decoder layers, so skipped layers
    and cached positions add nothing)."""
    calls = []
    for name, module in model.named_modules():
        if name.endswith("mlp"):
            module.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[:-1].numel()))
    return calls


@pytest.mark.parametrize("kind", ["trace", "patch"])
@pytest.mark.parametrize("share_prefix,skip_layers", [(True, False), (False, True), (True, True)])
def test_compute_reuse_equals_full_recomputation(tiny, kind, share_prefix, skip_layers):
    """Reusing the baseline key/value cache before the restored position, and the baseline
    layer outputs below the restored layer, changes nothing, and really skips the work."""
    family, model, tokenizer = tiny
    if kind == "trace":
        spec = trace_spec(positions=["all", "subject"])
    else:
        spec = parse_spec({"kind": "patch", "model": "tiny", "sites": ["block_output", "mlp_key"],
                           "metric": "kl", "max_batch_rows": 1,
                           "prompts": [{"base": "big ben is in london", "source": "the colosseum is in rome"}]})
    plan = compile_spec(spec, model, tokenizer, share_prefix=share_prefix, skip_layers=skip_layers)
    assert plan.shares_prefix == share_prefix and any(c.prefix > 2 for c in plan.chunks) == share_prefix
    assert plan.skips_layers == skip_layers and any(c.start > 0 for c in plan.chunks) == skip_layers
    full_plan = compile_spec(spec, model, tokenizer, share_prefix=False, skip_layers=False)
    calls = _mlp_tokens(model)
    fast = run_plan(plan)
    fast_work = sum(calls)
    full = run_plan(full_plan)
    assert fast_work < sum(calls) - fast_work       # less MLP work than the full run
    for name, grid in fast.grids.items():
        assert torch.allclose(grid.values, full.grids[name].values, atol=TOL, equal_nan=True)
    for module in model.modules():
        module._forward_pre_hooks.clear()


def test_compiling_runs_no_forward_pass(tiny_llama, monkeypatch):
    """A spec compiles into graphs and unit locations without touching the model's forward."""
    model, tokenizer = tiny_llama
    calls = []
    for module in model.modules():
        monkeypatch.setattr(module, "forward", lambda *a, _f=module.forward, **k: calls.append(1) or _f(*a, **k))
    plan = compile_spec(trace_spec(sigma=0.5), model, tokenizer)
    assert calls == []
    chunk = next(c for c in plan.chunks if not c.baseline)
    locations, subspaces = plan.unit_locations(chunk), plan.subspaces(chunk)
    graph = plan.graphs[chunk.graph]
    assert len(locations["base"]) == len(subspaces) == len(graph.sorted_keys)
    assert all(len(rows) == len(chunk.rows) for rows in locations["base"])


def test_local_folder_model(tmp_path, tiny_llama, monkeypatch):
    from interventions import load_model

    model, tokenizer = tiny_llama
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path))
    spec = trace_spec(samples=2, sites=["hidden"])
    a, b = run(spec, model, tokenizer), run(spec, loaded, loaded_tok)
    assert torch.allclose(a.grids["hidden"].values, b.grids["hidden"].values, atol=TOL, equal_nan=True)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_llama_table_covers_mistral_and_qwen2(tokenizer, family):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=64, initializer_range=0.3)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    base, source = "big ben is in london", "the colosseum is in rome"
    spec = parse_spec({"kind": "patch", "model": "tiny", "sites": ["attention_output", "mlp_key"], "metric": "kl",
                       "prompts": [{"base": base, "source": source}]})
    result = run(spec, model, tokenizer)
    src = ref.last_logits(model, family, torch.tensor([words(tokenizer, source)]))[0].log_softmax(-1)
    for site in ("attention_output", "mlp_key"):
        clean = ref.capture(model, family, words(tokenizer, source), site)
        for layer in range(2):
            for pos in range(5):
                lp = ref.last_logits(model, family, torch.tensor([words(tokenizer, base)]),
                                     restores=[(site, layer, [pos], clean[layer])])[0].log_softmax(-1)
                want = float((src.exp() * (src - lp)).sum())
                assert abs(float(result.grids[site].values[0, layer, pos]) - want) <= 1e-5
