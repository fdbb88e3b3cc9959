"""The logit lens, the tuned lens and attention knockout against independent computations.

- Lens: states from transformers' own ``output_hidden_states`` (not pyvene), read through the final
  norm and the unembedding by hand; at the last layer the lens must give the model's own output.
- Knockout: the model run with transformers' *eager* attention, and a forward pre-hook on each
  attention module of the window that edits the 4D attention mask by hand (the cut edges get the
  mask's minimum). Nothing of Lesion's attention function or pyvene is used.
"""

from __future__ import annotations

import copy

import pytest
import torch

from interventions import parse_spec
from interventions.core.conventions import window
from interventions.lenses.knockout import SCORES, run_knockout
from interventions.lenses.lens import TunedLens, load_tuned_lens, run_lens, train_tuned_lens
from interventions.modalities.vision_language.llava import image_positions, image_prompt, load_image
from support.models import make_vlm_pair

PROMPTS = ["the eiffel tower is located in the city of", "the colosseum is in", "big ben is a famous old"]


def _final_norm(model):
    return model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm


def _by_hand(model, ids: list[int], target: int, translate=None) -> torch.Tensor:
    """(layer, position) p(target), from output_hidden_states[1:] (pre-norm block outputs; the last
    entry is already normed in transformers, so it is taken from the logits instead)."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
        hidden = out.hidden_states[1:]
        rows = []
        for layer, h in enumerate(hidden[:-1]):
            h = h[0] if translate is None else translate(h[0], layer)
            logits = model.get_output_embeddings()(_final_norm(model)(h))
            cap = getattr(model.config, "final_logit_softcapping", None)
            logits = logits if cap is None else torch.tanh(logits / cap) * cap
            rows.append(logits.log_softmax(-1)[:, target].exp())
        rows.append(out.logits[0].log_softmax(-1)[:, target].exp())
    return torch.stack(rows)


@pytest.mark.parametrize("max_batch_rows", [48, 1])
def test_logit_lens_equals_hidden_states_read_by_hand(tiny, max_batch_rows):
    family, model, tok = tiny
    spec = parse_spec({"kind": "lens", "model": "m", "prompts": [{"prompt": p, "target": "paris"} for p in PROMPTS]})
    result = run_lens(spec, model, tok, max_batch_rows=max_batch_rows)
    target = tok("paris", add_special_tokens=False).input_ids[0]
    for i, p in enumerate(PROMPTS):
        ids = tok(p).input_ids
        want = _by_hand(model, ids, target)
        got = result.grids["logit_lens"].values[i, :, :len(ids)]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert torch.isnan(result.grids["logit_lens"].values[i, :, len(ids):]).all()
        # the last layer's lens is the model's own answer
        assert result.prompts[i]["clean_prob"] == pytest.approx(float(want[-1, -1]), abs=1e-6)
        rank = result.grids["logit_lens_rank"].values[i, -1, len(ids) - 1]
        assert (rank == 0) == (result.prompts[i]["answer"] == "paris")


def test_lens_grid_of_a_prompt_does_not_depend_on_its_batch(tiny_llama):
    model, tok = tiny_llama
    spec = parse_spec({"kind": "lens", "model": "m", "prompts": [{"prompt": p} for p in PROMPTS]})
    together = run_lens(spec, model, tok)
    for i, p in enumerate(PROMPTS):
        alone = run_lens(parse_spec({"kind": "lens", "model": "m", "prompts": [{"prompt": p}]}), model, tok)
        n = len(tok(p).input_ids)
        torch.testing.assert_close(together.grids["logit_lens"].values[i, :, :n],
                                   alone.grids["logit_lens"].values[0, :, :n], atol=1e-6, rtol=1e-5)
        assert together.prompts[i]["logit_lens_top_k"] == alone.prompts[0]["logit_lens_top_k"]


def test_tuned_lens_applies_its_translators_and_round_trips(tiny_llama, tmp_path):
    model, tok = tiny_llama
    lens = TunedLens(model.config.hidden_size, [0, 1, 2], rank=3, seed=1)
    with torch.no_grad():
        for t in lens.translators.values():
            t.B.normal_(0, 0.3)
            t.bias.normal_(0, 0.3)
    lens.save(tmp_path / "lens.safetensors")
    loaded = load_tuned_lens(tmp_path / "lens.safetensors", model)
    spec = parse_spec({"kind": "lens", "model": "m", "tuned": str(tmp_path / "lens.safetensors"),
                       "prompts": [{"prompt": PROMPTS[0], "target": "paris"}]})
    result = run_lens(spec, model, tok)
    target = tok("paris", add_special_tokens=False).input_ids[0]

    def translate(h, layer):          # by hand: h + (h A) B + b
        t = loaded.translators[str(layer)]
        return h + (h @ t.A) @ t.B + t.bias

    want = _by_hand(model, tok(PROMPTS[0]).input_ids, target, translate)
    torch.testing.assert_close(result.grids["tuned_lens"].values[0], want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(result.grids["tuned_lens"].values[0, :-1], result.grids["logit_lens"].values[0, :-1])


def test_training_the_tuned_lens_lowers_held_out_kl(tiny_llama):
    model, tok = tiny_llama
    texts = [" ".join(PROMPTS[i % 3].split()[::(1 if i % 2 else -1)]) for i in range(40)]
    before = {n: p.clone() for n, p in model.named_parameters()}
    lens, report = train_tuned_lens(model, tok, texts, rank=4, steps=60, batch_tokens=32, lr=1e-2, log=None)
    assert sum(report["heldout_kl_tuned_lens"]) < sum(report["heldout_kl_logit_lens"])
    assert all(torch.equal(p, before[n]) and p.requires_grad for n, p in model.named_parameters())


def test_a_tuned_lens_for_another_model_names_the_field(tiny_llama, tmp_path):
    from interventions.core.errors import SpecError

    model, tok = tiny_llama
    TunedLens(model.config.hidden_size + 1, [0], rank=2).save(tmp_path / "other.safetensors")
    with pytest.raises(SpecError, match="tuned"):
        load_tuned_lens(tmp_path / "other.safetensors", model)


# ---------------------------------------------------------------------------------------- knockout
def _knocked_by_hand(model, ids: list[int], cut: dict[int, tuple[int, list[int]]], target_pos: int,
                     answer: int, attention=None) -> float:
    """p(answer) at `target_pos` with eager attention and, at each layer in `cut`, the mask entries
    (query t, keys P) set to the mask's minimum by a pre-hook on that layer's attention module."""
    ref = copy.deepcopy(model)
    ref.config._attn_implementation = "eager"
    handles = []
    for layer, (t, keys) in cut.items():
        module = attention(ref, layer)

        def pre(mod, args, kwargs, t=t, keys=keys):
            mask = kwargs["attention_mask"].clone()
            mask[:, :, t, keys] = torch.finfo(mask.dtype).min
            return args, {**kwargs, "attention_mask": mask}
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor([ids])).logits
    for h in handles:
        h.remove()
    return float(logits[0, target_pos].log_softmax(-1)[answer].exp())


def _lm_attention(model, layer):
    return model.model.layers[layer].self_attn


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_knockout_equals_an_eager_mask_edited_by_hand(family, tokenizer):
    from support.models import make_model

    model, tok = make_model(family, len(tokenizer)), tokenizer
    prompts = [{"prompt": PROMPTS[0], "subject": "eiffel tower", "target": "paris"},
               {"prompt": PROMPTS[1], "subject": "colosseum", "target": "rome"}]
    spec = parse_spec({"kind": "knockout", "model": "m", "window": 2, "prompts": prompts,
                       "block": ["subject", "others", "self", "all"], "targets": ["last", "subject_last"]})
    result = run_knockout(spec, model, tok, max_batch_rows=7)
    n = model.config.num_hidden_layers
    for i, p in enumerate(prompts):
        ids = tok(p["prompt"]).input_ids
        answer = tok(p["target"], add_special_tokens=False).input_ids[0]
        last, subject = len(ids) - 1, [k for k, w in enumerate(p["prompt"].split()) if w in p["subject"].split()]
        assert result.prompts[i]["clean_prob"] == pytest.approx(_knocked_by_hand(model, ids, {}, last, answer,
                                                                                 _lm_attention), abs=1e-6)
        for c, t in enumerate([last, subject[-1]]):
            sets = {"subject": [s for s in subject if s <= t], "others": [k for k in range(t) if k not in subject],
                    "self": [t], "all": list(range(t))}
            for name, keys in sets.items():
                if not keys:
                    continue
                for k in range(n):
                    want = _knocked_by_hand(model, ids, {layer: (t, keys) for layer in window(k, 2, n)}, t, answer,
                                            _lm_attention)
                    got = float(result.grids[name].values[i, k, c])
                    assert got == pytest.approx(want, abs=2e-6), (family, i, name, k, c)
    # nothing is left behind: implementation, child modules, outputs
    assert model.config._attn_implementation != SCORES
    assert not any(name.endswith(SCORES) for name, _ in model.named_modules())


def test_knockout_changes_the_output_where_it_cuts_and_nowhere_else(tiny_llama):
    """Not a silent no-op: cutting every edge but the self edge at all layers moves p(answer); a window
    of layers not reaching the grid's cell leaves the other layers' rows at the clean value."""
    model, tok = tiny_llama
    spec = parse_spec({"kind": "knockout", "model": "m", "window": 1, "block": ["all"],
                       "prompts": [{"prompt": PROMPTS[0], "target": "paris"}]})
    result = run_knockout(spec, model, tok)
    values = result.grids["all"].values[0, :, 0]
    assert (values - result.prompts[0]["clean_prob"]).abs().max() > 1e-3


def test_vlm_knockout_of_image_and_constraint_equals_the_mask_edited_by_hand():
    _, vlm, tok = make_vlm_pair()
    question = " the capital of"
    spec = parse_spec({"kind": "knockout", "model": "m", "window": 1, "block": ["image", "constraint", "others"],
                       "prompts": [{"image": "flag:France", "prompt": question, "target": "paris",
                                    "constraint": "capital"}]})
    result = run_knockout(spec, vlm, tok)
    ids = image_prompt(tok, vlm, question)
    image = image_positions(ids, vlm)
    constraint = [k for k, i in enumerate(ids) if tok.decode([i]).strip() == "capital"]
    last = len(ids) - 1
    pixels = load_image("flag:France", vlm)
    answer = tok("paris", add_special_tokens=False).input_ids[0]

    def by_hand(keys, layer):
        ref = copy.deepcopy(vlm)
        ref.config._attn_implementation = "eager"
        module = ref.model.language_model.layers[layer].self_attn

        def pre(mod, args, kwargs):
            mask = kwargs["attention_mask"].clone()
            mask[:, :, last, keys] = torch.finfo(mask.dtype).min
            return args, {**kwargs, "attention_mask": mask}
        module.register_forward_pre_hook(pre, with_kwargs=True)
        with torch.no_grad():
            logits = ref(input_ids=torch.tensor([ids]), pixel_values=pixels[None]).logits
        return float(logits[0, last].log_softmax(-1)[answer].exp())

    others = [k for k in range(last) if k not in image and k not in constraint]
    for name, keys in (("image", image), ("constraint", constraint), ("others", others)):
        for layer in range(vlm.config.text_config.num_hidden_layers):
            assert float(result.grids[name].values[0, layer, 0]) == pytest.approx(by_hand(keys, layer), abs=2e-6)
    assert result.prompts[0]["image_positions"] == image


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_collecting_without_logits_stops_after_the_deepest_layer_with_the_same_states(tokenizer, family):
    from interventions.core.prompts import encode
    from interventions.lenses.lens import collect_states
    from support.models import make_model

    model = make_model(family, len(tokenizer))
    encs = [encode(tokenizer, t, field="t") for t in ("the eiffel tower is in paris", "big ben is in london and")]
    full, logits = collect_states(model, tokenizer, encs, [0, 2])
    calls = []
    handle = model.get_submodule("transformer.h.3" if family == "gpt2" else "model.layers.3").register_forward_hook(
        lambda *a: calls.append(1))
    try:
        cut, none = collect_states(model, tokenizer, encs, [0, 2], logits=False)
    finally:
        handle.remove()
    assert none is None and logits.shape[0] == 2 and calls == []          # layer 3 never ran
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(full, cut))
    layers = model.transformer.h if family == "gpt2" else model.model.layers
    assert len(layers) == 4                                               # the layer list is restored
