"""Fixtures shared by every test; the helpers they use live in tests/support/ (`from support.models
import make_model`), one import style for all of them."""

from __future__ import annotations

import os

import pytest
import torch

from support.models import FAMILIES, make_model, make_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session", params=FAMILIES)
def tiny(request, tokenizer):
    """(family, model, tokenizer) for each tiny family."""
    return request.param, make_model(request.param, len(tokenizer)), tokenizer


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    return make_model("llama", len(tokenizer)), tokenizer


@pytest.fixture()
def tiny_folder(tmp_path, tokenizer, monkeypatch):
    """`tmp_path` holding a tiny seeded Llama saved as a local Hugging Face folder, `tiny/`, with
    `$LESION_HOME` pointed inside it."""
    monkeypatch.setenv("LESION_HOME", str(tmp_path / "home"))
    make_model("llama", len(tokenizer)).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path


@pytest.fixture()
def float64_norms(monkeypatch):
    """Llama's and Gemma 3's RMSNorm compute in float32 whatever the input; finite differences in
    float64 need the whole model in float64, so the norms are replaced by the same formula in the
    input's dtype for these tests."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def llama(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def gemma(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    monkeypatch.setattr(LlamaRMSNorm, "forward", llama)
    monkeypatch.setattr(Gemma3RMSNorm, "forward", gemma)
