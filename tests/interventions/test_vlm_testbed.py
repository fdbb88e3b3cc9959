"""The shipped VLM testbed: SmolLM2-135M inside LLaVA with the trained flag vision tower (issue 6's testbed)."""

from __future__ import annotations

import json

import pytest
import torch

from interventions.core.paths import CHECKPOINTS as ROOT
from interventions.modalities.vision_language.llava import VLM_TESTBED_FILE, image_prompt, load_vlm_testbed
from interventions.testbeds.flags import COUNTRIES, render
from recipes.train.train_flags import NAMING, top1

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def testbed():
    return load_vlm_testbed()


def test_checkpoint_is_listed_with_its_evaluation():
    path = ROOT / VLM_TESTBED_FILE
    assert path.stat().st_size < 25e6
    entry = {a["path"]: a for a in json.loads((ROOT / "manifest.json").read_text())["artefacts"]}[VLM_TESTBED_FILE]
    assert entry["recipe"] == "recipes/train/train_flags.py" and entry["evaluation"]["naming"] >= 0.9


def test_testbed_names_held_out_flags_and_keeps_the_language_model(testbed):
    vlm, tokenizer, meta = testbed
    which = [i for i in range(len(COUNTRIES)) for _ in range(2)]
    pixels = render(which, torch.Generator().manual_seed(7_000_000))
    hits = top1(vlm, tokenizer, [image_prompt(tokenizer, vlm, NAMING)] * len(which), pixels,
                [COUNTRIES[i][0] for i in which])
    assert sum(hits) / len(hits) >= 0.9
    from interventions import load_model

    lm, _ = load_model(meta["language_model"])
    ids = torch.tensor([tokenizer("The Eiffel Tower is located in the city of").input_ids])
    with torch.no_grad():
        want = lm(ids, output_hidden_states=True)
        got = vlm(input_ids=ids, output_hidden_states=True)
    # Every layer's states are bit-identical, and so are the output embedding's rows of the language
    # model's vocabulary. The logits themselves are not always: the VLM's output matrix has one more
    # row (the image token), and on some CPUs (seen on an AVX-512/AMX machine) the GEMM rounds a
    # 49,153-column product differently from a 49,152-column one (3.7e-5 at most there).
    assert len(got.hidden_states) == len(want.hidden_states)
    for g, w in zip(got.hidden_states, want.hidden_states):
        assert torch.equal(g, w)
    vocab = want.logits.shape[-1]
    assert torch.equal(vlm.get_output_embeddings().weight[:vocab], lm.get_output_embeddings().weight)
    torch.testing.assert_close(got.logits[..., :vocab], want.logits, rtol=0, atol=1e-4)


def test_knockout_of_the_image_tokens_matters_only_late(testbed):
    """Cutting image -> last over 9-layer windows: p(Paris) falls by more than half in the window centred on
    layer 25 and by less than 10% in the window centred on layer 3 (the recipe's finding, with margins)."""
    from interventions import parse_spec
    from interventions.lenses.knockout import run_knockout

    vlm, tokenizer, _ = testbed
    spec = parse_spec({"kind": "knockout", "model": "llava-flags-smollm2", "window": 9, "block": ["image"],
                       "layers": [3, 25], "prompts": [{"image": "flag:France", "target": " Paris",
                                                      "prompt": " This is the flag of a country whose capital is"}]})
    result = run_knockout(spec, vlm, tokenizer)
    clean = result.prompts[0]["clean_prob"]
    early, late = (float(v) / clean - 1 for v in result.grids["image"].values[0, :, 0])
    assert clean > 0.5 and late < -0.5 and early > -0.1


def test_the_shipped_flag_dictionary_has_country_features_and_patching_them_moves_the_answer(testbed):
    """The known truth: feature 158 fires on renders of Japan's flag and on no other flag, 19 on France's; and
    the recipe's patch rows (`recipes/features/patch_flag_features.yaml`) move the answer as its write-up says."""
    import sae_lens

    from interventions import load_spec, run
    from interventions.features.dictionary import load_dictionary
    from interventions.lenses.lens import collect_states, prepare

    vlm, tokenizer, _ = testbed
    d = load_dictionary(ROOT / "sae_flags_vlm_l3")
    assert (d.where.site, d.where.layer, d.d_sae, d.k) == ("block_output", 3, 512, 8)
    assert sae_lens.SAE.load_from_disk(str(ROOT / "sae_flags_vlm_l3")).cfg.d_sae == 512
    readings = [prepare(vlm, tokenizer, " This is the flag of", field="x", image=f"flag:{c}@{20_000 + s}", vision=True)
                for c, _ in COUNTRIES for s in range(2)]
    states, _ = collect_states(vlm, tokenizer, [r.enc for r in readings], [3])
    fired = torch.stack([d.encode(s[0][list(r.groups["image"])]).amax(0) > 0 for s, r in zip(states, readings)])
    names = [c for c, _ in COUNTRIES for _ in range(2)]
    assert [n for n, on in zip(names, fired[:, 158]) if on] == ["Japan", "Japan"]
    assert [n for n, on in zip(names, fired[:, 19]) if on] == ["France", "France"]
    result = run(load_spec("recipes/features/patch_flag_features.yaml"), vlm, tokenizer)
    image = result.prompts[0]["image_column"]
    base = result.prompts[0]["base_metric"]
    rows = result.grids["features"].values[0, :, image] - base
    whole = float(result.grids["block_output"].values[0, 0, image]) - base
    assert whole > 10 and 0.5 < rows[0] < 2 and 0.5 < rows[1] < 2 and rows[2] > rows[0]
    assert abs(float(rows[3]) - whole) < 0.2
