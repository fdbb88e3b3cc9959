"""Text-to-image interventions on tiny seeded SD-shaped pipelines, against plain-hook references.

- sampling: batched equals sequential;
- text-encoder trace (swap and noise corruption) and the cross-attention window trace: pyvene
  equals a plain PyTorch-hook implementation, context by context and image by image;
- erase: the closed form equals an independent least-squares solve, satisfies its normal
  equations, is low rank, applies and reverts bit-exactly, and refuses another pipeline;
- the site table names SD v1.x's 16 cross-attention layers.
"""

from __future__ import annotations

import pytest
import torch

from editors.delta import DeltaError, applied, apply, revert
from editors.methods.erase import aligned_positions, edit_sets, erase, normal_equation_residual
from interventions.core.errors import SpecError
from interventions.modalities.text_to_image.pipeline import DiffusionSites, cross_attention_layers
from interventions.modalities.text_to_image.trace import (
    attn_windows,
    corrupt,
    cross_attention_hook,
    embedding_sigma,
    text_cells,
    text_contexts,
    trace,
)
from interventions.spec import DiffusionTraceSpec, EraseSpec, dump_spec, load_yaml, parse_spec
from support import reference as ref
from support.diffusion import SD_V1_ATTN2, ChannelEvaluator, sd_v1_unet, tiny_sd


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd(0)


def _spec(**kw):
    base = dict(model="tiny-sd-0", prompts=[{"prompt": "a red cat", "subject": "red",
                                             "counterfactual_subject": "blue"}], images=4)
    return DiffusionTraceSpec(**{**base, **kw})


# ------------------------------------------------------------------ sites and sampling
def test_site_table_names_sd_v1_cross_attention_in_run_order():
    unet = sd_v1_unet()
    assert cross_attention_layers(unet) == SD_V1_ATTN2
    names = {n for n, _ in unet.named_parameters()}
    projections = [f"{a}.{p}.weight" for a in SD_V1_ATTN2 for p in ("to_k", "to_v")]
    assert len(projections) == 32 and set(projections) <= names


def test_sampling_batched_equals_sequential(pipe):
    prompts, seeds = ["a red cat", "a blue dog", "a green car"], [5, 6, 7]
    batched = pipe.generate(prompts, seeds)
    one = torch.cat([pipe.generate([p], [s]) for p, s in zip(prompts, seeds)])
    torch.testing.assert_close(batched, one, atol=1e-5, rtol=0)
    assert not torch.allclose(batched[0], batched[1])


def test_generate_needs_one_seed_per_prompt(pipe):
    with pytest.raises(SpecError, match="seeds"):
        pipe.generate(["a red cat", "a dog"], [0])


# ------------------------------------------------------------------ plain-hook references
def _hook_layer(module, pos, value):
    def hook(mod, args, out):
        t = out[0] if isinstance(out, tuple) else out
        t[:, pos] = value
    return module.register_forward_hook(hook)


def reference_context(pipe, c, site, layers, pos, sample):
    """One text-encoder forward per cell with plain hooks: clean states recorded, then restored."""
    enc = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)
    mods = {"text_hidden": lambda l: enc.encoder.layers[l], "text_mlp": lambda l: enc.encoder.layers[l].mlp,
            "text_attention": lambda l: enc.encoder.layers[l].self_attn}[site]
    clean = {}
    handles = []
    for l in layers:
        def rec(mod, args, out, l=l):
            clean[l] = (out[0] if isinstance(out, tuple) else out).clone()
        handles.append(mods(l).register_forward_hook(rec))
    with torch.no_grad():
        pipe.text_encoder(input_ids=c.clean_ids)
    for h in handles:
        h.remove()
    handles = [_hook_layer(mods(l), pos, clean[l][:, pos]) for l in layers]
    if c.noise is not None:
        def add(mod, args, out):
            out[:, c.subject] += c.noise[sample]
        handles.append(enc.embeddings.register_forward_hook(add))
    try:
        with torch.no_grad():
            return pipe.text_encoder(input_ids=c.corrupt_ids).last_hidden_state
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("site", ["text_hidden", "text_mlp", "text_attention"])
@pytest.mark.parametrize("corruption", ["swap", "noise"])
def test_text_trace_contexts_equal_plain_hook_reference(pipe, site, corruption):
    spec = _spec(corruption=corruption, samples=2, window=2)
    c = corrupt(pipe, spec, 0, embedding_sigma(pipe, spec) if corruption == "noise" else None)
    n = DiffusionSites(pipe).text_layers
    _, cells = text_cells(spec, n, 8, site)
    # the windows are the language-model engine's: ROME's, clipped at the edges (not shifted)
    assert [layers for layers, pos in cells if pos == 0] == [
        [l] if site == "text_hidden" else ref.window(l, 2, n) for l in range(n)]
    for sample in ([None] if corruption == "swap" else [0, 1]):
        got = text_contexts(pipe, c, site, cells, sample)
        for (layers, pos), row in zip(cells, got):
            want = reference_context(pipe, c, site, layers, pos, sample)[0]
            torch.testing.assert_close(row, want, atol=1e-5, rtol=1e-5)
    clean = pipe.encode(["a red cat"])[0]
    corrupted = reference_context(pipe, c, site, [], 0, 0 if c.noise is not None else None)[0]
    assert (clean - corrupted).abs().max() > 1e-2, "the corruption must change the context"


def reference_window_images(pipe, window, clean_ctx, corrupt_ctx, seeds):
    """One sampling run per window with plain pre-hooks giving to_k/to_v the clean context (cond rows)."""
    names = DiffusionSites(pipe).cross_attention
    unet = pipe.unet
    handles = []
    for j in window:
        attn = unet.get_submodule(names[j])
        for proj in (attn.to_k, attn.to_v):
            def pre(mod, args):
                x = args[0].clone()
                n = len(x) // 2
                x[n:] = clean_ctx
                return (x,)
            handles.append(proj.register_forward_pre_hook(pre))
    try:
        return pipe.sample(corrupt_ctx.expand(len(seeds), -1, -1), seeds)
    finally:
        for h in handles:
            h.remove()


def test_cross_attention_window_equals_plain_hook_reference(pipe):
    clean = pipe.encode(["a red cat"])
    corrupted = pipe.encode(["a blue cat"])
    uncond = pipe.encode([""])
    n_attn = len(DiffusionSites(pipe).cross_attention)
    wins = attn_windows(n_attn, 2)
    seeds = [3, 4]
    hook = cross_attention_hook(pipe, [w for w in wins for _ in seeds], torch.cat([uncond, clean]))
    got = pipe.sample(corrupted.expand(len(wins) * len(seeds), -1, -1), seeds * len(wins), unet_hook=hook)
    for k, w in enumerate(wins):
        want = reference_window_images(pipe, w, clean, corrupted, seeds)
        torch.testing.assert_close(got[k * len(seeds):(k + 1) * len(seeds)], want, atol=1e-5, rtol=0)
    full = reference_window_images(pipe, range(n_attn), clean, corrupted, seeds)
    torch.testing.assert_close(full, pipe.sample(clean.expand(2, -1, -1), seeds), atol=1e-5, rtol=0)
    assert (got[:2] - pipe.sample(corrupted.expand(2, -1, -1), seeds)).abs().max() > 1e-3


def test_trace_grid_equals_reference_shares(pipe):
    spec = _spec(sites=("text_hidden", "cross_attention"), images=3, attn_window=1)
    clean = pipe.encode(["a red cat"])
    seeds = [0, 1, 2]
    base = pipe.sample(clean.expand(3, -1, -1), seeds)
    evaluator = ChannelEvaluator({"red": float(base[:, 0].mean())})
    result = trace(spec, pipe, evaluator)
    c = corrupt(pipe, spec, 0, None)
    layers, cells = text_cells(spec, DiffusionSites(pipe).text_layers, 8, "text_hidden")
    grid = result.grids["text_hidden"].values[0]
    for (ls, pos) in cells:
        ctx = reference_context(pipe, c, "text_hidden", ls, pos, None)
        images = pipe.sample(ctx.expand(3, -1, -1), seeds)
        assert grid[ls[0], pos] == pytest.approx(float(evaluator.shows(images, "red").float().mean()))
    corrupted = pipe.encode(["a blue cat"])
    for k, w in enumerate(attn_windows(len(DiffusionSites(pipe).cross_attention), 1)):
        images = reference_window_images(pipe, w, clean, corrupted, seeds)
        assert result.grids["cross_attention"].values[0, k, 0] == pytest.approx(
            float(evaluator.shows(images, "red").float().mean()))
    assert result.prompts[0]["clean_prob"] == pytest.approx(float(evaluator.shows(base, "red").float().mean()))
    assert result.grids["text_hidden"].values.shape == (1, len(layers), 8)


def test_trace_positions_prompt_stops_at_eos(pipe):
    spec = _spec(sites=("text_mlp",), positions="prompt", images=1, corruption="noise", samples=3)   # draws > images
    result = trace(spec, pipe, ChannelEvaluator({"red": 0.5}))
    assert result.grids["text_mlp"].values.shape == (1, 3, 5)          # <bos> a red cat <eos>
    assert result.prompts[0]["columns"] == ["<bos>", "a", "red", "cat", "<eos>"]


def test_noise_corruption_is_seeded(pipe):
    spec = _spec(corruption="noise", samples=3, seed=11)
    sigma = embedding_sigma(pipe, spec)
    a, b = corrupt(pipe, spec, 0, sigma), corrupt(pipe, spec, 0, sigma)
    assert torch.equal(a.noise, b.noise)
    assert not torch.equal(a.noise, corrupt(pipe, _spec(corruption="noise", samples=3, seed=12), 0, sigma).noise)
    # keyed by the prompt, not by its index: second of two prompts = the same prompt alone
    two = _spec(corruption="noise", samples=3, seed=11, prompts=[
        {"prompt": "a blue cat", "subject": "blue"}, {"prompt": "a red cat", "subject": "red"}])
    assert torch.equal(corrupt(pipe, two, 1, sigma).noise, a.noise)


def test_swap_needs_a_counterfactual_of_equal_length(pipe):
    spec = _spec(prompts=[{"prompt": "a red cat", "subject": "red", "counterfactual_subject": "blue green"}])
    with pytest.raises(SpecError, match="counterfactual_subject"):
        corrupt(pipe, spec, 0, None)
    with pytest.raises(SpecError, match=r"prompts\[0\].subject"):
        corrupt(pipe, _spec(prompts=[{"prompt": "a red cat", "subject": "dog", "counterfactual_subject": "cat"}]),
                0, None)


# ------------------------------------------------------------------ erase
def _erase_spec(**kw):
    base = dict(model="tiny-sd-0", concepts=[{"concept": "red", "guide": "blue"}], preserve=["green", "yellow"],
                templates=["a {} cat", "a {} dog"], lam=0.1)
    return EraseSpec(**{**base, **kw})


def test_positions_align_concept_and_guide(pipe):
    _, _, pairs = aligned_positions(pipe, "a {} cat", "red", "blue", "concepts[0].concept")
    assert pairs == [(q, q) for q in range(2, 8)]
    _, other, pairs = aligned_positions(pipe, "a {} cat", "red", "", "concepts[0].concept")
    assert other == "a cat"
    assert pairs[:3] == [(2, 2), (3, 2), (4, 3)] and pairs[-1] == (7, 6)


def _lstsq_reference(W, sets, lam, s):
    """W' from an independent stacked least-squares solve (float64)."""
    W = W.double()
    d = W.shape[1]
    A = torch.cat([sets.erase, s ** 0.5 * sets.preserve, lam ** 0.5 * torch.eye(d, dtype=torch.float64)])
    B = torch.cat([sets.guide @ W.T, s ** 0.5 * sets.preserve @ W.T, lam ** 0.5 * W.T])
    return torch.linalg.lstsq(A, B).solution.T


@pytest.mark.parametrize("kind", [dict(method="uce"), dict(method="time", preserve=()),
                                  dict(edit="text_encoder", layer=1)])
def test_erase_solves_its_defining_equations(pipe, kind):
    spec = _erase_spec(**kind)
    sets = edit_sets(spec, pipe)
    s = spec.preserve_scale if spec.method == "uce" else 0.0
    delta = erase(spec, pipe)
    params = dict(pipe.named_parameters())
    before = {n: params[n].detach().clone() for n in delta.names}
    with applied(pipe, delta):
        for name in delta.names:
            new = params[name].detach()
            torch.testing.assert_close(new.double(), _lstsq_reference(before[name], sets, spec.lam, s),
                                       atol=2e-5, rtol=1e-4)
            assert normal_equation_residual(new, before[name], sets, spec.lam, s) < 1e-5
            if name in delta.factors:
                assert delta.factors[name][0].shape[1] <= len(sets.erase)
    expected = DiffusionSites(pipe).projections() if spec.edit == "cross_attention" else \
        [n for n, _ in pipe.named_parameters() if n.endswith("encoder.layers.1.self_attn.out_proj.weight")]
    assert sorted(delta.names) == sorted(expected)


def test_erase_maps_the_concept_onto_the_guide(pipe):
    spec = _erase_spec(method="time", preserve=(), lam=1e-4)
    delta = erase(spec, pipe)
    name = DiffusionSites(pipe).projections()[0]
    W = dict(pipe.named_parameters())[name].detach().clone()
    sets = edit_sets(spec, pipe)
    with applied(pipe, delta):
        Wn = dict(pipe.named_parameters())[name].detach()
        err = (sets.erase.float() @ Wn.T - sets.guide.float() @ W.T).norm() / (sets.guide.float() @ W.T).norm()
    assert err < 1e-2


def test_erase_delta_applies_and_reverts_bit_exactly_and_is_verified(pipe, tmp_path):
    spec = _erase_spec()
    delta = erase(spec, pipe)
    path = delta.save(tmp_path / "erase.safetensors")
    from editors.delta import load_delta

    loaded = load_delta(path)
    state = {n: p.detach().clone() for n, p in pipe.named_parameters()}
    base_images = pipe.generate(["a red cat"], [0])
    apply(pipe, loaded)
    edited = pipe.generate(["a red cat"], [0])
    revert(pipe, loaded)
    for n, p in pipe.named_parameters():
        assert torch.equal(p, state[n]), n
    assert torch.equal(pipe.generate(["a red cat"], [0]), base_images)
    assert (edited - base_images).abs().max() > 1e-3
    other = tiny_sd(1)
    with pytest.raises(DeltaError, match="tiny-sd-0"):
        apply(other, loaded)
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(other.named_parameters(), tiny_sd(1).named_parameters()))


def test_erase_spec_round_trips_and_rejects_bad_input():
    spec = parse_spec({"kind": "erase", "concepts": [{"concept": "red", "guide": "blue"}], "preserve": ["green"],
                       "templates": ["a {} circle"]})
    assert parse_spec(load_yaml(dump_spec(spec))) == spec
    with pytest.raises(SpecError, match="templates"):
        parse_spec({"kind": "erase", "concepts": [{"concept": "red"}], "templates": ["a circle"]})
    with pytest.raises(SpecError, match="layer"):
        parse_spec({"kind": "erase", "concepts": [{"concept": "red"}], "edit": "text_encoder"})
    with pytest.raises(SpecError, match="preserve"):
        parse_spec({"kind": "erase", "concepts": [{"concept": "red"}], "method": "time", "preserve": ["blue"]})
    trace_spec = parse_spec({"kind": "trace", "modality": "text-to-image", "model": "shapes-diffusion", "prompts": [
        {"prompt": "a red circle", "subject": "red", "counterfactual_subject": "blue"}], "sites": ["cross_attention"]})
    assert isinstance(trace_spec, DiffusionTraceSpec)
    assert parse_spec(load_yaml(dump_spec(trace_spec))) == trace_spec
    with pytest.raises(SpecError, match="text_hidden"):
        parse_spec({"kind": "trace", "modality": "text-to-image", "model": "shapes-diffusion", "prompts": [
            {"prompt": "a red circle", "subject": "red"}], "sites": ["hidden"]})


def test_erase_rejects_unknown_concept_and_layer(pipe):
    with pytest.raises(SpecError, match=r"concepts\[0\].concept"):
        erase(_erase_spec(concepts=[{"concept": "purple", "guide": "blue"}]), pipe)
    with pytest.raises(SpecError, match="layer"):
        erase(_erase_spec(edit="text_encoder", layer=7), pipe)
