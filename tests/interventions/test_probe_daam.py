"""Linear probes against scikit-learn on states from plain transformers outputs; DAAM maps against
cross-attention probabilities computed by hand from forward pre-hooks on the UNet's ``attn2`` modules."""

from __future__ import annotations

import pytest
import torch

from interventions import parse_spec
from interventions.lenses.probe import control_labels, fit_logistic, run_probe, stratified_split

PROMPTS = ["the eiffel tower is in paris", "the colosseum is in rome", "big ben is in london",
           "the statue of liberty is in new york", "paris is the capital of france", "rome is the capital of italy",
           "london is the capital of england", "the eiffel tower was built by people", "the colosseum is old",
           "big ben is famous", "the statue of liberty is great", "new york is a famous city"]
LABELS = ["france", "italy", "england", "new york", "france", "italy", "england", "france", "italy", "england",
          "new york", "new york"]


def test_fit_logistic_equals_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 7, generator=g, dtype=torch.float64)
    y = (x[:, :3] @ torch.randn(3, 3, generator=g, dtype=torch.float64)).argmax(1)
    for l2 in (0.5, 2.0):
        w, b = fit_logistic(x, y, 3, l2)
        ref = LogisticRegression(C=1 / l2, tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
        # multinomial weights are defined up to a shared shift per feature; compare centred ones
        ours, theirs = w - w.mean(0), torch.from_numpy(ref.coef_) - torch.from_numpy(ref.coef_).mean(0)
        torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-3)
        assert ((x @ w.T + b).argmax(1).numpy() == ref.predict(x.numpy())).all()


def test_splits_are_disjoint_stratified_and_keep_groups_whole():
    labels = [0] * 10 + [1] * 6 + [2] * 2
    groups = [f"g{i // 2}" for i in range(18)]
    for g in (None, groups):
        train, test = stratified_split(labels, 0.3, seed=1, groups=g)
        assert not set(train) & set(test) and sorted(train + test) == list(range(18))
        assert {labels[i] for i in train} == {0, 1, 2}
        # label 2 is one group: it cannot be held out whole and still be trained on
        assert {labels[i] for i in test} == ({0, 1, 2} if g is None else {0, 1})
        if g is not None:
            assert not {groups[i] for i in train} & {groups[i] for i in test}
    assert stratified_split(labels, 0.3, seed=1) == stratified_split(labels, 0.3, seed=1)
    drawn = control_labels(groups, labels, seed=3)
    assert drawn == control_labels(groups, labels, seed=3)
    assert all(len({d for d, gg in zip(drawn, groups) if gg == k}) == 1 for k in set(groups))


def test_probe_accuracy_equals_scikit_learn_on_plain_hidden_states(tiny_llama):
    from sklearn.linear_model import LogisticRegression

    model, tok = tiny_llama
    spec = parse_spec({"kind": "probe", "model": "m", "layers": [0, 2, 3], "positions": ["last", 1], "l2": 0.7,
                       "heldout": 0.34, "examples": [{"prompt": p, "label": lab} for p, lab in zip(PROMPTS, LABELS)]})
    report = run_probe(spec, model, tok)["report"]
    names = sorted(set(LABELS))
    y = torch.tensor([names.index(v) for v in LABELS])
    train, test = stratified_split(y.tolist(), 0.34, 0)
    with torch.no_grad():
        hidden = [model(torch.tensor([tok(p).input_ids]), output_hidden_states=True).hidden_states for p in PROMPTS]
    for k, layer in enumerate([0, 2, 3]):
        for c, pos in enumerate([-1, 1]):
            x = torch.stack([h[layer + 1][0, pos] for h in hidden]).double()
            if layer == model.config.num_hidden_layers - 1:      # transformers norms its last entry
                continue
            mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
            ref = LogisticRegression(C=1 / 0.7, tol=1e-10, max_iter=10_000).fit(
                ((x[train] - mean) / std).numpy(), y[train].numpy())
            want = float((ref.predict(((x[test] - mean) / std).numpy()) == y[test].numpy()).mean())
            assert report["accuracy"][k][c] == pytest.approx(want)
            assert report["selectivity"][k][c] == pytest.approx(want - report["control_accuracy"][k][c])


def test_probe_concept_vectors_load_as_steering_vectors(tiny_llama, tmp_path):
    from interventions.lenses.steering import check_vector, load_vector
    from recipes.jobs.run_lenses import write_probe

    model, tok = tiny_llama
    spec = parse_spec({"kind": "probe", "model": "m", "layers": [1], "examples":
                       [{"prompt": p, "label": lab} for p, lab in zip(PROMPTS, LABELS)]})
    report = write_probe(spec, model, tok, None, tmp_path)
    assert (tmp_path / "report.json").is_file() and (tmp_path / "probe.png").is_file()
    assert len(report["concept_vectors"]) == len(set(LABELS))
    vectors = sorted(tmp_path.glob("concept_*.safetensors"))
    assert len(vectors) == len(set(LABELS))
    for path in vectors:
        v = load_vector(path)
        check_vector(model, v)
        assert v.layers == [1] and v.meta["method"] == "probe" and float(v.vectors[1].norm()) > 0


# ------------------------------------------------------------------------------------------- DAAM
def _maps_by_hand(pipe, prompt, positions, seeds, layers=None):
    """Pre-hooks on every attn2 catch its input and context; softmax(q k^T * scale) per head by hand."""
    from interventions.modalities.text_to_image.pipeline import cross_attention_layers

    modules = dict(pipe.unet.named_modules())
    names = cross_attention_layers(pipe.unet)
    size = pipe.unet.config.sample_size * (2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae else 1)
    total = {"maps": None}

    def pre(mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        ctx = kwargs["encoder_hidden_states"]
        n, heads = h.shape[0], mod.heads
        q = mod.to_q(h).reshape(n, h.shape[1], heads, -1).transpose(1, 2)
        k = mod.to_k(ctx).reshape(n, ctx.shape[1], heads, -1).transpose(1, 2)
        p = (q @ k.transpose(-1, -2) * mod.scale).softmax(-1)[n // 2:].sum(1)     # (rows, hw, tokens)
        side = int(p.shape[1] ** 0.5)
        p = p.transpose(1, 2).reshape(p.shape[0], -1, side, side)
        up = torch.nn.functional.interpolate(p, size=(size, size), mode="bicubic", align_corners=False).clamp_min(0)
        total["maps"] = up if total["maps"] is None else total["maps"] + up

    handles = [modules[name].register_forward_pre_hook(pre, with_kwargs=True)
               for k, name in enumerate(names) if layers is None or k in layers]
    try:
        images = pipe.generate([prompt] * len(seeds), list(seeds))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for word, pos in positions.items():
        m = total["maps"][:, pos].sum(1)
        lo, hi = m.flatten(1).min(1).values[:, None, None], m.flatten(1).max(1).values[:, None, None]
        out[word] = (m - lo) / (hi - lo)
    return images, out


@pytest.mark.parametrize("layers", [None, [1]])
def test_daam_maps_equal_attention_computed_by_hand(layers):
    from interventions.modalities.text_to_image.daam import word_maps, word_tokens
    from support.diffusion import tiny_sd

    pipe = tiny_sd()
    prompt = "a photo of red circle"
    want_images, want = _maps_by_hand(pipe, prompt, {w: word_tokens(pipe, prompt, w, "w") for w in ("red", "circle")},
                                      range(3), layers)
    images, maps = word_maps(pipe, prompt, ["red", "circle"], range(3), layers=layers)
    torch.testing.assert_close(images, want_images, atol=1e-5, rtol=1e-4)     # recording changes no image
    for w in ("red", "circle"):
        torch.testing.assert_close(maps[w], want[w], atol=1e-5, rtol=1e-4)
        assert maps[w].amin() == 0 and float(maps[w].amax()) == pytest.approx(1.0)
    # the processors are put back
    assert all(type(m.processor).__name__ != "MapsProcessor" for m in pipe.unet.modules() if hasattr(m, "processor"))


def test_daam_word_positions_and_iou_by_hand():
    from interventions.core.errors import SpecError
    from interventions.modalities.text_to_image.daam import iou, word_tokens
    from support.diffusion import tiny_sd

    pipe = tiny_sd()
    assert word_tokens(pipe, "a photo of red circle", "red", "w") == [4]       # <bos> a photo of red
    with pytest.raises(SpecError, match="a word of the prompt"):
        word_tokens(pipe, "a photo of red circle", "re", "words")
    region = torch.tensor([[[1, 1], [0, 0]]], dtype=torch.bool)
    truth = torch.tensor([[[1, 0], [1, 0]]], dtype=torch.bool)
    assert float(iou(region, truth)[0]) == pytest.approx(1 / 3)
