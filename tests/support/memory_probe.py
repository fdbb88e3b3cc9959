"""Run one trace sweep in a fresh process and print its measured peak memory as JSON.

    python tests/support/memory_probe.py [BUDGET_BYTES] [--vlm]

A fresh process, so that memory freed by earlier work cannot hide the sweep's own
allocations. The model is a seeded random Llama, wide enough (d = 256, 12 prompts ×
10 samples) that the sweep's working memory dwarfs the interpreter's noise. With ``--vlm``
it sits inside a LLaVA-1.5-shaped model: 336-pixel images in 14-pixel patches, so 576 image
tokens per prompt (a one-layer vision tower: the language model's sweep is what is measured).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))      # tests/, for `support`
sys.path.insert(0, str(Path(__file__).parents[2]))      # the project

from support.models import WORDS, make_tokenizer  # noqa: E402


def sweep_spec():
    from interventions import parse_spec

    subjects = [f"{a} {b}" for a in WORDS[:4] for b in WORDS[6:9]]
    prompts = [{"prompt": f"the {s} is located in the city of", "subject": s} for s in subjects]
    return parse_spec({"kind": "trace", "model": "tiny", "prompts": prompts, "samples": 10, "seed": 1,
                       "sites": ["hidden", "mlp", "attention"], "window": 3, "sigma": 0.5})


def vlm_sweep(tokenizer):
    """A LLaVA-1.5-shaped tiny VLM around the wide Llama, and a trace of two flags over every layer."""
    from interventions import parse_spec
    from interventions.modalities.vision_language.llava import VisionSpec, assemble_llava

    vision = VisionSpec(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2)
    vlm, tokenizer = assemble_llava(make_wide_model(len(tokenizer) + 1), tokenizer, vision)
    prompts = [{"image": f"flag:{c}", "prompt": " the capital of", "target": "paris"} for c in ("France", "Japan")]
    spec = parse_spec({"kind": "trace", "model": "tiny-llava", "prompts": prompts, "samples": 3, "seed": 1,
                       "sites": ["hidden", "mlp"], "window": 3, "sigma": 0.5, "image_cells": "block"})
    return vlm, tokenizer, spec


def make_wide_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                      initializer_range=0.1, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def main() -> None:
    from interventions import compile_spec, run_plan
    from interventions.core.memory import PeakMemory

    torch.set_num_threads(1)
    args = [a for a in sys.argv[1:] if a != "--vlm"]
    budget = int(args[0]) if args else None
    tokenizer = make_tokenizer()
    if "--vlm" in sys.argv:
        model, tokenizer, spec = vlm_sweep(tokenizer)
    else:
        model, spec = make_wide_model(4096), sweep_spec()
    # The process's first sweep pays a one-time cost (kernel caches, interpreter state) that
    # no budget covers; a short sweep of the same shapes pays it first, and is measured too.
    warm_up = compile_spec(spec.model_copy(update={"prompts": spec.prompts[:2]}), model, tokenizer, memory=budget)
    with PeakMemory("cpu") as first:
        run_plan(warm_up, progress=False)
    plan = compile_spec(spec, model, tokenizer, memory=budget)
    with PeakMemory("cpu") as peak:
        result = run_plan(plan, progress=False)
    print(json.dumps({"peak": peak.bytes, "warm_up_peak": first.bytes, "blocks": len(plan.blocks),
                      "chunks": len(plan.chunks), "tokens": len(plan.prompts[0].base),
                      "grids": {k: g.values.tolist() for k, g in result.grids.items()}}))


if __name__ == "__main__":
    main()
