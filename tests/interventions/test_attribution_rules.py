"""Attribution rules (`rule:` of `method: attribution`): RelP's relevance conservation, AtP*'s QK fix
against exact patching of the key side, GradDrop by hand, and each rule on every family and on a VLM."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from interventions import SpecError, parse_spec, run
from interventions.engine.rules import QKFix, relp_rules
from interventions.models.attention import lesion_attention
from interventions.models.sites import site_table
from support.models import make_model, make_vlm_pair, random_dictionary

EIFFEL = {"prompt": "the eiffel tower is located in the city of", "subject": "eiffel tower"}
BASE, SOURCE = "the eiffel tower is located in the city of", "the colosseum tower is located in the city of"
RULES = ("relp", "qk-fix", "atp-star")


def _ids(tokenizer, text):
    return torch.tensor([tokenizer(text)["input_ids"]])


def _layer_outputs(model, table, kept: list):
    """Hooks keeping every decoder layer's output, with its gradient retained."""
    def keep(module, args, out):
        t = out[0] if isinstance(out, tuple) else out
        t.retain_grad()
        kept.append(t)
    layers = [table.module(model, "block_output", layer) for layer in range(table.num_layers(model))]
    return [m.register_forward_hook(keep) for m in layers]


def _relevance(model, tokenizer, *, rules: bool) -> tuple[float, list[float]]:
    """(logit(paris) − logit(rome) at the last position, Σ a · ĝ at the embeddings and after each layer)."""
    table = site_table(model)
    embeds = model.get_input_embeddings()(_ids(tokenizer, BASE)).detach().requires_grad_()
    kept = []
    handles = _layer_outputs(model, table, kept)
    a, b = tokenizer.convert_tokens_to_ids(["paris", "rome"])
    try:
        with relp_rules(model, table) if rules else lesion_attention(model):
            logits = model(inputs_embeds=embeds).logits[0, -1]
            m = logits[a] - logits[b]
            m.backward()
    finally:
        for h in handles:
            h.remove()
    return float(m.detach()), [float((t.detach() * t.grad).sum()) for t in [embeds, *kept]]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_relp_conserves_relevance_layer_by_layer(tokenizer, family, float64_norms):
    """On a model without biases, RelP's rules make every layer linear in its input given the held
    quantities (norm scales, attention probabilities, act(x)/x, half of each gate product), so
    Σ a · ĝ over positions and features equals the (linear) metric at the embeddings and after every
    layer. Plain gradients do not conserve it (checked, so the test can fail)."""
    model = make_model(family, len(tokenizer)).double()
    m, relevance = _relevance(model, tokenizer, rules=True)
    assert abs(m) > 0.1
    for layer, r in enumerate(relevance):
        assert r == pytest.approx(m, abs=1e-9), layer
    _, plain = _relevance(model, tokenizer, rules=False)
    assert max(abs(r - m) for r in plain) > 1e-2


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_relp_leaves_forward_values_alone(tokenizer, family):
    """The rules change the backward pass only: logits equal the same attention's without them, bit
    for bit, and the model's own attention to float rounding; the model's config and hooks are restored."""
    model = make_model(family, len(tokenizer))
    table, ids = site_table(model), _ids(tokenizer, BASE)
    before = model.config._attn_implementation
    with torch.no_grad():
        own = model(ids).logits
        with lesion_attention(model):
            eager = model(ids).logits
        with relp_rules(model, table):
            ruled = model(ids).logits
    assert torch.equal(ruled, eager)
    torch.testing.assert_close(ruled, own, atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _one_head_model(tokenizer):
    """Two layers, one head, float64, and nothing nonlinear after layer 1's attention probabilities: the final
    norm is the identity and layer 1's MLP outputs zero. The metric is then linear in those probabilities."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=64,
                      initializer_range=0.5, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).double().eval()
    model.model.norm = nn.Identity()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.zero_()
    return model


def _keys(model, ids, *, replace=None):
    """Layer 1's key projection output, its gradient for the metric, and the metric, with `replace(k)`
    applied to the projection's output."""
    kept = {}

    def hook(module, args, out):
        out = (replace(out) if replace is not None else out).detach().requires_grad_()
        kept["k"] = out
        return out
    handle = model.model.layers[1].self_attn.k_proj.register_forward_hook(hook)
    try:
        logits = model(ids).logits[0, -1]
        m = logits[3] - logits[4]
        m.backward()
    finally:
        handle.remove()
    return kept["k"].detach(), kept["k"].grad, float(m.detach())


@pytest.mark.parametrize("columns", [[(1,), (2,), (4,)], [(1, 2)]])
def test_qk_fix_equals_exact_patching_of_the_key_side(tokenizer, columns):
    """One head, linear after the pattern: for a delta at layer 1's input, the QK fix's pattern term
    Σ ∇A · (A' − A) equals exact patching of the keys alone at the column's positions (plain hooks),
    and its correction is that minus the linear term ∇k · Δk (∇q is zero off the last position)."""
    model = _one_head_model(tokenizer)
    table = site_table(model)
    base, source = _ids(tokenizer, BASE), _ids(tokenizer, SOURCE)
    for p in model.parameters():
        p.requires_grad_(False)
    hidden = {}
    for name, ids in (("base", base), ("source", source)):
        with torch.no_grad():
            hidden[name] = model(ids, output_hidden_states=True).hidden_states[1]
    k_source, _, _ = _keys(model, source)
    k_base, k_grad, m_base = _keys(model, base)
    qk = QKFix(model, table)
    embeds = model.get_input_embeddings()(base).requires_grad_()
    with qk.recording():
        logits = model(inputs_embeds=embeds).logits[0, -1]
        (logits[3] - logits[4]).backward()
    qk.keep_grads(None)
    delta = (hidden["source"] - hidden["base"])[None]
    with lesion_attention(model):
        fixes = qk.corrections(1, delta, columns, [None])[0, 0]
    for positions, fix in zip(columns, fixes):
        p = list(positions)

        def patch(k, p=p):
            k = k.clone()
            k[:, p] = k_source[:, p]
            return k
        _, _, m_keys = _keys(model, base, replace=patch)
        linear = float((k_grad[:, p] * (k_source[:, p] - k_base[:, p])).sum())
        assert abs(m_keys - m_base) > 1e-3
        assert float(fix) + linear == pytest.approx(m_keys - m_base, abs=1e-9), positions


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
@pytest.mark.parametrize("window", [1, 3])
def test_qk_fix_is_attribution_patching_for_small_corruptions(tokenizer, family, window):
    """The QK fix replaces a linear term by the exact change it linearises, so as the corruption shrinks
    it approaches plain attribution patching (at 0.001 σ: within 1% of the largest effect)."""
    model = make_model(family, len(tokenizer))
    data = {"kind": "trace", "model": "tiny", "prompts": [EIFFEL], "samples": 2, "seed": 1, "window": window,
            "noise": 0.001, "method": "attribution"}
    plain = run(parse_spec(data), model, tokenizer)
    fixed = run(parse_spec({**data, "rule": "qk-fix"}), model, tokenizer)
    assert fixed.meta["rule"] == "qk-fix"
    for name in ("hidden", "mlp", "attention"):
        a, b = plain.indirect_effect(name), fixed.indirect_effect(name)
        scale = float(a.abs().max())
        assert scale > 0 and float((a - b).abs().max()) < 0.01 * scale, name


def test_qk_fix_moves_cells_at_full_corruption(tiny_llama):
    """At the default 3σ noise the fix changes the grids (it is not a no-op)."""
    model, tokenizer = tiny_llama
    data = {"kind": "trace", "model": "tiny", "prompts": [EIFFEL], "samples": 2, "method": "attribution"}
    plain = run(parse_spec(data), model, tokenizer).indirect_effect("hidden")
    fixed = run(parse_spec({**data, "rule": "qk-fix"}), model, tokenizer).indirect_effect("hidden")
    assert float((plain - fixed).abs().max()) > 1e-3


def test_atp_star_by_hand_at_the_last_layer(tiny_llama):
    """GradDrop: 1/(L−1) Σ_ℓ |estimate with layer ℓ's outputs' gradient dropped|. After the last layer no
    drop changes the gradient and no attention follows, so the hidden cell there is L/(L−1) · |AtP term|;
    the last layer's attention output loses its own gradient in its own layer's drop: |AtP term|."""
    model, tokenizer = tiny_llama
    data = {"kind": "trace", "model": "tiny", "prompts": [EIFFEL], "samples": 2, "method": "attribution",
            "window": 1}
    plain, star = (run(parse_spec({**data, "rule": rule}), model, tokenizer) for rule in ("gradient", "atp-star"))
    n = 4
    torch.testing.assert_close(star.indirect_effect("hidden")[0, -1],
                               plain.indirect_effect("hidden")[0, -1].abs() * n / (n - 1), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(star.indirect_effect("attention")[0, -1],
                               plain.indirect_effect("attention")[0, -1].abs(), atol=1e-7, rtol=1e-6)
    assert bool((star.indirect_effect("mlp") >= 0).all())
    assert star.meta["backward_passes"] == n + 1 and star.meta["rule"] == "atp-star"


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_runs_patches_and_leaves_the_model_alone(tiny, rule):
    """Every rule on a patch grid (logit_diff) of every family, windowed: finite cells, the model's weights,
    hooks and attention implementation as before."""
    family, model, tokenizer = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = parse_spec({"kind": "patch", "model": "tiny", "metric": "logit_diff", "window": 2,
                       "prompts": [{"base": BASE, "source": SOURCE}], "method": "attribution", "rule": rule,
                       "sites": ["block_output", "mlp_output", "attention_output", "mlp_key"]})
    result = run(spec, model, tokenizer)
    for grid in result.grids.values():
        assert bool(torch.isfinite(grid.values).all())
    assert result.meta["rule"] == rule
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("rule", RULES)
def test_rules_on_a_vlm_equal_the_language_model_on_text(rule):
    """A text-only prompt through the tiny LLaVA gives the bare language model's grid under every rule
    (embeddings in, noise where they enter), and an image prompt gives finite cells on every image token."""
    lm, vlm, tok = make_vlm_pair()
    prompt = "the eiffel tower is located in the city of"
    common = {"samples": 2, "seed": 2, "window": 3, "model": "tiny", "method": "attribution", "rule": rule}
    vl = parse_spec({"kind": "trace", "modality": "vision-language", "corruption": "text", **common,
                     "prompts": [{"prompt": prompt, "target": " paris", "constraint": "eiffel tower"}]})
    language = parse_spec({"kind": "trace", **common,
                           "prompts": [{"prompt": prompt, "subject": "eiffel tower", "target": " paris"}]})
    a, b = run(vl, vlm, tok), run(language, lm, tok)
    for name in b.grids:
        torch.testing.assert_close(a.grids[name].values, b.grids[name].values, atol=1e-6, rtol=0)
    image = parse_spec({"kind": "trace", "model": "tiny-llava", "samples": 2, "seed": 1, "method": "attribution",
                        "rule": rule, "image_cells": "both",
                        "prompts": [{"image": "flag:France", "prompt": " the capital of", "target": "paris"}]})
    result = run(image, vlm, tok)
    assert all(bool(torch.isfinite(g.values).all()) for g in result.grids.values())


def test_batched_prompts_equal_each_alone(tiny_llama):
    model, tokenizer = tiny_llama
    colosseum = {"prompt": "the colosseum is in the city of", "subject": "colosseum"}
    data = {"kind": "trace", "model": "tiny", "samples": 2, "seed": 1, "method": "attribution", "rule": "qk-fix",
            "window": 3, "sigma": 0.5}        # σ given: by default it is measured over all prompts' subjects
    both = run(parse_spec({**data, "prompts": [EIFFEL, colosseum]}), model, tokenizer)
    for i, prompt in enumerate((EIFFEL, colosseum)):
        alone = run(parse_spec({**data, "prompts": [prompt]}), model, tokenizer)
        for name in alone.grids:
            one = alone.grids[name].values[0]         # the batch's grid is as wide as its longest prompt
            torch.testing.assert_close(both.grids[name].values[i, :, :one.shape[1]], one, atol=1e-7, rtol=0)


@pytest.mark.parametrize("data,field", [
    ({"rule": "relp"}, "rule"),                                   # exact patching has no gradient
    ({"method": "attribution", "rule": "qk-fix", "steps": 4}, "steps"),
    ({"method": "attribution", "rule": "gradients"}, "rule"),
])
def test_bad_rules_name_the_field(data, field):
    with pytest.raises(SpecError) as err:
        parse_spec({"kind": "trace", "prompts": [EIFFEL], **data})
    assert field in str(err.value)


def test_qk_fix_refuses_a_feature_grid(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    random_dictionary("standard", layer=2).save(tmp_path / "sae")
    spec = parse_spec({"kind": "trace", "model": "tiny", "prompts": [EIFFEL], "method": "attribution",
                       "rule": "qk-fix", "sites": ["hidden"], "layers": [2],
                       "features": {"dictionary": str(tmp_path / "sae"), "features": [0, 3]}})
    with pytest.raises(SpecError) as err:
        run(spec, model, tokenizer)
    assert "rule" in str(err.value)
