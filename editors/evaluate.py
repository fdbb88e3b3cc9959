"""CounterFact-style metrics of an edit (Meng et al. 2022), measured on the model as it is now.

- efficacy: the edit prompt prefers the new target: p(new) > p(true);
- paraphrase: the share of paraphrases that prefer the new target;
- neighbourhood: the share of neighbour prompts (other subjects) that still prefer the true target;
- fluency: mean weighted bigram/trigram entropy of text generated about the subjects.

A target's probability is the mean log-probability of all its tokens (teacher forced).

>>> round(ngram_entropy("a b a b a b"), 4)   # bigrams ab×3, ba×2; trigrams aba×2, bab×2
0.9903
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

from interventions.metrics import continuation_logprob
from interventions.prompts import pad_token_id, right_pad


def ngram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """ROME's fluency measure: the mean of weighted n-gram entropies (bits) of the words of `text`."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    total = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        count = sum(grams.values())
        h = -sum(c / count * math.log2(c / count) for c in grams.values()) if count else 0.0
        total.append(w * h)
    return sum(total) / len(total)


@torch.no_grad()
def target_logprobs(model, tokenizer, prompts: list[str], target: str) -> list[float]:
    """Mean log-probability of `target`'s tokens after each prompt: one float per prompt."""
    device = next(model.parameters()).device
    tgt = tokenizer(target, add_special_tokens=False)["input_ids"]
    seqs = [tokenizer(p)["input_ids"] + tgt for p in prompts]
    logits = model(**right_pad(seqs, pad_token_id(tokenizer), device)).logits
    return [continuation_logprob(logits[i], len(s) - len(tgt), tgt) for i, s in enumerate(seqs)]


def prefers(model, tokenizer, prompts: list[str], first: str, second: str) -> list[bool]:
    """For each prompt: is `first` more probable than `second`?"""
    if not prompts:
        return []
    a, b = target_logprobs(model, tokenizer, prompts, first), target_logprobs(model, tokenizer, prompts, second)
    return [x > y for x, y in zip(a, b)]


@torch.no_grad()
def fluency(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 60, seed: int = 0) -> float:
    """Mean n-gram entropy of top-k (5) sampled continuations, seeded."""
    torch.manual_seed(seed)
    texts = []
    pad = pad_token_id(tokenizer)
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
        out = model.generate(**enc, do_sample=True, top_k=5, max_new_tokens=max_new_tokens, pad_token_id=pad)
        texts.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return sum(ngram_entropy(t) for t in texts) / len(texts)


def evaluate(model, tokenizer, requests, *, fluency_prompts: list[str], seed: int = 0) -> dict:
    """Metrics over `requests` (each with prompt, subject, target_new, target_true, paraphrases, neighbours)."""
    per = []
    for r in requests:
        edit = r.prompt.replace("{}", r.subject)
        per.append({
            "subject": r.subject,
            "efficacy": float(prefers(model, tokenizer, [edit], r.target_new, r.target_true)[0]),
            "paraphrase": mean_present(prefers(model, tokenizer, list(r.paraphrases), r.target_new, r.target_true)),
            "neighbourhood": mean_present(prefers(model, tokenizer, list(r.neighbours), r.target_true,
                                                  r.target_new)),
            "p_new": math.exp(target_logprobs(model, tokenizer, [edit], r.target_new)[0]),
            "p_true": math.exp(target_logprobs(model, tokenizer, [edit], r.target_true)[0]),
        })
    summary = {k: mean_present([p[k] for p in per]) for k in ("efficacy", "paraphrase", "neighbourhood")}
    summary["fluency"] = fluency(model, tokenizer, fluency_prompts, seed=seed)
    return {**summary, "per_request": per}


def mean_present(values: list) -> float | None:
    """The mean of the values that are not None (a request may have no paraphrases); None if none are."""
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None
