"""Tiny seeded models built from configs, and a word-level tokenizer, all offline.

The weights are initialised with a large std on purpose: with the usual 0.02 the
output distribution is nearly uniform and a wrong intervention would move the
metrics by less than the tolerance, so the comparisons would prove nothing.
"""

from __future__ import annotations

import torch

WORDS = ("the eiffel tower is located in city of paris rome colosseum big ben london statue liberty new york "
         "a an and famous old great which where capital france italy england was built by people").split()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>")


def make_model(family: str, vocab_size: int):
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=4, n_head=4,
                         initializer_range=0.3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          initializer_range=0.3, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    elif family == "gemma3":
        cfg = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               max_position_embeddings=64, sliding_window=4, initializer_range=0.3,
                               layer_types=["sliding_attention", "sliding_attention", "sliding_attention",
                                            "full_attention"])
        model = Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model.eval()


FAMILIES = ("gpt2", "llama", "gemma3")


def make_vlm_pair(vision=None):
    """(lm, vlm, tokenizer): a tiny seeded LLaVA around a tiny Llama. The tokenizer knows <image> before the
    LM is made, and the LM's rows for it are the VLM's, so that the two compute the same text logits exactly.
    `vision`: the tower's `VisionSpec` (default: 2 layers, 4 patches)."""
    from interventions.modalities.vision_language.llava import IMAGE_TOKEN, VisionSpec, assemble_llava

    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    lm = make_model("llama", len(tok))
    vision = vision or VisionSpec(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    vlm, tok = assemble_llava(lm, tok, vision)
    with torch.no_grad():
        lm.get_input_embeddings().weight.copy_(vlm.get_input_embeddings().weight)
        lm.lm_head.weight.copy_(vlm.lm_head.weight)
    return lm, vlm, tok


def random_dictionary(architecture: str, d_in: int = 32, d_sae: int = 64, seed: int = 0, layer: int = 1, **extra):
    """A seeded feature dictionary of the tiny models' width at `block_output` of `layer`."""
    from interventions.features.dictionary import Dictionary, Where

    g = torch.Generator().manual_seed(seed)
    d = Dictionary(d_in, d_sae, architecture, k=8 if architecture == "topk" else None,
                   where=Where("block_output", layer, "tiny"), **extra)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return d
