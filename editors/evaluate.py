"""CounterFact-style metrics of an edit (Meng et al. 2022), measured on the model as it is now.

- efficacy: the edit prompt prefers the new target: p(new) > p(true);
- paraphrase: the share of paraphrases that prefer the new target;
- neighbourhood: the share of neighbour prompts (other subjects) that still prefer the true target;
- fluency: mean weighted bigram/trigram entropy of text generated about the subjects.

A target's probability is the mean log-probability of all its tokens (teacher forced).

Judged by what the model writes instead (`generation_metrics`, as *The Mirage of Model Editing*
argues): the greedy continuation of a prompt must state the answer, by the rule of `states`.

>>> round(ngram_entropy("a b a b a b"), 4)   # bigrams ab×3, ba×2; trigrams aba×2, bab×2
0.9903
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter

import torch

from interventions.core.metrics import continuation_logprob
from interventions.core.prompts import pad_token_id, right_pad


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
def score_pairs(model, tokenizer, pairs: list[tuple[str, str]], *, batch: int = 64) -> list[float]:
    """Mean log-probability of each target's tokens after its prompt (teacher forced), one float per
    ``(prompt, target)`` pair. Pairs that need the same token sequence (a one-token target after the
    same prompt) share one row; rows run `batch` at a time, right-padded."""
    device = next(model.parameters()).device
    asks, rows = [], {}
    for prompt, target in pairs:
        tgt = tokenizer(target, add_special_tokens=False)["input_ids"]
        ids = tokenizer(prompt)["input_ids"]
        seq = tuple(ids + tgt[:-1])
        asks.append((rows.setdefault(seq, len(rows)), len(ids), tgt))
    seqs = list(rows)
    by_row: dict[int, list[int]] = {}
    for k, (row, _, _) in enumerate(asks):
        by_row.setdefault(row, []).append(k)
    out = [0.0] * len(asks)
    for start in range(0, len(seqs), batch):
        part = seqs[start:start + batch]
        logits = model(**right_pad(part, pad_token_id(tokenizer), device), use_cache=False).logits
        for i in range(len(part)):
            for k in by_row[start + i]:
                _, at, tgt = asks[k]
                out[k] = continuation_logprob(logits[i], at, tgt)
    return out


def target_logprobs(model, tokenizer, prompts: list[str], target: str) -> list[float]:
    """Mean log-probability of `target`'s tokens after each prompt: one float per prompt."""
    return score_pairs(model, tokenizer, [(p, target) for p in prompts])


def prefers(model, tokenizer, prompts: list[str], first: str, second: str) -> list[bool]:
    """For each prompt: is `first` more probable than `second`?"""
    return prefers_each(model, tokenizer, [(p, first, second) for p in prompts])


def prefers_each(model, tokenizer, asks: list[tuple[str, str, str]]) -> list[bool]:
    """For each ``(prompt, first, second)``: is `first` more probable than `second` after the prompt?
    All scored in one batched pass (`score_pairs`)."""
    scores = score_pairs(model, tokenizer, [(p, t) for p, a, b in asks for t in (a, b)])
    return [x > y for x, y in zip(scores[::2], scores[1::2])]


@torch.no_grad()
def top1_tokens(model, tokenizer, prompts: list[str], *, batch: int = 64) -> list[int]:
    """The greedy next token after each prompt, `batch` prompts at a time, right-padded."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch):
        seqs = [tokenizer(p)["input_ids"] for p in prompts[start:start + batch]]
        logits = model(**right_pad(seqs, pad_token_id(tokenizer), device), use_cache=False).logits
        out += [int(logits[i, len(s) - 1].argmax()) for i, s in enumerate(seqs)]
    return out


def first_token(tokenizer, text: str) -> int:
    """The first token of `text` as a continuation (no special tokens): the token an answer is judged by."""
    return tokenizer(text, add_special_tokens=False)["input_ids"][0]


def top1_accuracy(model, tokenizer, facts: list[tuple[str, str]], *, batch: int = 64) -> float:
    """The share of ``(prompt, answer)`` facts whose answer's first token is the greedy next token."""
    tops = top1_tokens(model, tokenizer, [p for p, _ in facts], batch=batch)
    return sum(t == first_token(tokenizer, a) for t, (_, a) in zip(tops, facts)) / len(facts)


@torch.no_grad()
def perplexity(model, tokenizer, text: str, *, window: int = 256) -> float:
    """exp(mean next-token NLL) of `text`, in non-overlapping windows of `window` tokens."""
    ids = tokenizer(text)["input_ids"]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        part = torch.tensor([ids[start:start + window + 1]], device=device)
        if part.shape[1] < 2:
            break
        logp = model(input_ids=part[:, :-1], use_cache=False).logits.float().log_softmax(-1)
        total -= float(logp[0].gather(1, part[0, 1:, None]).sum())
        count += part.shape[1] - 1
    return math.exp(total / count)


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


def image_answers(vlm, tokenizer, pixels: torch.Tensor, others: torch.Tensor | None, questions: list[str],
                  kl_prompt: str) -> dict:
    """A vision-language model's top-1 answers: to each question about `pixels` and about each of `others`,
    and after `kl_prompt` (does the image still read as what it was?)."""
    from interventions.modalities.vision_language.llava import top_answers

    own = {q: top_answers(vlm, tokenizer, pixels[None], q)[0] for q in questions}
    rest = {q: top_answers(vlm, tokenizer, others, q) for q in questions} if others is not None else {}
    return {"answers": own, "other_images": rest, "kl_prompt_answer": top_answers(vlm, tokenizer, pixels[None], kl_prompt)[0]}


def image_edit_metrics(spec, before: dict, after: dict, n_others: int) -> dict:
    """Efficacy and generalisation (shares of questions and paraphrases answering `target_new`), specificity
    (other images keeping their answers) and whether the image's own reading was kept."""
    new = spec.target_new.strip()
    questions = list(spec.questions) + list(spec.paraphrases)

    def share(which, qs):
        return sum(which["answers"][q] == new for q in qs) / len(qs) if qs else None

    return {"efficacy": share(after, spec.questions), "efficacy_before": share(before, spec.questions),
            "generalisation": share(after, spec.paraphrases),
            "generalisation_before": share(before, spec.paraphrases),
            "specificity": (sum(a == b for q in questions for a, b in zip(before["other_images"][q],
                                                                           after["other_images"][q]))
                            / (len(questions) * n_others)) if n_others else None,
            "kl_prompt_kept": float(before["kl_prompt_answer"] == after["kl_prompt_answer"])}


#: Words a continuation may hold before the answer starts ("the city of Rome": three).
ANSWER_WINDOW = 3
ARTICLES = ("a", "an", "the")


def normalise_words(text: str) -> list[str]:
    """The words of `text` as answers are matched: accents dropped (NFKD, then ASCII), lower case, every
    run of characters other than letters and digits a word break."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", " ", text).split()


def first_sentence(text: str) -> str:
    """`text` up to its first line break, or its first ``.``, ``!`` or ``?`` followed by a space or the end."""
    return re.split(r"[.!?](?:\s|$)|\n", text, maxsplit=1)[0]


def answer_at(words: list[str], answer: str) -> int | None:
    """Where the answer's words (less a leading article) start in `words`, if they start within the
    first ``ANSWER_WINDOW + 1`` words; else None."""
    want = normalise_words(answer)
    if len(want) > 1 and want[0] in ARTICLES:
        want = want[1:]
    if not want:
        return None
    for i in range(min(ANSWER_WINDOW + 1, len(words))):
        if words[i:i + len(want)] == want:
            return i
    return None


def states(continuation: str, answer: str, rival: str | None = None) -> bool:
    """Does a greedy `continuation` state `answer`? The rule: both normalised (`normalise_words`), the
    answer's words (less a leading article) appear together in the continuation's first sentence
    (`first_sentence`), starting within its first ``ANSWER_WINDOW + 1`` words, and `rival` (the answer
    it must displace, or keep) does not start before it.

    >>> states(" the city of Rome, in Italy.", " Rome", rival=" Paris")
    True
    >>> states(" Paris, not Rome.", " Rome", rival=" Paris")
    False
    >>> states(" a city. It is near Rome.", " Rome")
    False
    """
    words = normalise_words(first_sentence(continuation))
    at = answer_at(words, answer)
    if at is None:
        return False
    other = answer_at(words, rival) if rival is not None else None
    return other is None or other >= at


@torch.no_grad()
def greedy_tokens(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 12, batch: int = 32) -> list[list[int]]:
    """Each prompt's greedy continuation as `max_new_tokens` token ids, `batch` prompts at a time,
    left-padded so that every row continues from its own last token (with the KV cache)."""
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    out = []
    for start in range(0, len(prompts), batch):
        seqs = [tokenizer(p)["input_ids"] for p in prompts[start:start + batch]]
        width = max(map(len, seqs))
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
        new = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, pad_token_id=pad)[:, width:]
        out += new.tolist()
    return out


def greedy_continuations(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 12,
                         batch: int = 32) -> list[str]:
    """Each prompt's greedy continuation, decoded (`greedy_tokens`)."""
    tokens = greedy_tokens(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch=batch)
    return tokenizer.batch_decode(tokens, skip_special_tokens=True)


def share_stating(continuations: list[str], asks: list[tuple[str, str | None]]) -> float | None:
    """The share of continuations that state their ``(answer, rival)`` (`states`); None if none."""
    if not asks:
        return None
    return sum(states(c, a, r) for c, (a, r) in zip(continuations, asks)) / len(asks)


@torch.no_grad()
def text_perplexity(model, tokenizer, prompts: list[str], texts: list[str]) -> float:
    """exp(mean NLL) of each text's tokens after its prompt, over all of them: how likely `model` finds
    what was generated (`model` being the unedited one, this is the generations' perplexity under it)."""
    counted = [(p, t, len(tokenizer(t, add_special_tokens=False)["input_ids"])) for p, t in zip(prompts, texts)]
    counted = [c for c in counted if c[2]]
    if not counted:
        return float("nan")
    scores = score_pairs(model, tokenizer, [(p, t) for p, t, _ in counted])
    counts = [n for _, _, n in counted]
    return math.exp(-sum(s * n for s, n in zip(scores, counts)) / sum(counts))
