"""Tokenize prompts, find the subject's tokens, and resolve position selectors.

>>> enc = encode(tokenizer, "The Eiffel Tower is in", subject="Eiffel Tower",
...              field="prompts[0]")                                     # doctest: +SKIP
>>> enc.subject                                                           # doctest: +SKIP
(1, 2, 3)
>>> columns(("subject_last", "last"), enc, "positions")                   # doctest: +SKIP
[('subject_last', (3,)), ('last', (5,))]
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from interventions.core.errors import SpecError


@dataclass(frozen=True)
class Encoded:
    """A tokenized prompt: ids, decoded tokens, and the subject's token positions.

    `embeds` ``(len, d)``, when set, is what the model runs on instead of the ids: a VLM prompt's
    input embeddings with its image's features in place of the image tokens (`interventions.modalities.vision_language.llava`),
    or an image's patch embeddings. The engine feeds them as ``inputs_embeds``; `ids` still name the positions.
    `context`, when set, is a second sequence of token ids the model reads with them (the text a vision-language
    model answers, when the prompt is its image's patch sequence); the engine feeds it as ``context_ids`` and
    ``context_mask``.
    """

    text: str
    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    subject: tuple[int, ...] = ()
    embeds: torch.Tensor | None = field(default=None, compare=False, repr=False)
    context: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)


def head(enc: Encoded, n: int) -> Encoded:
    """`enc` cut to its first `n` tokens (itself when no longer; a text-only prompt without a subject)."""
    return enc if len(enc) <= n else Encoded(enc.text, enc.ids[:n], enc.tokens[:n])


def overlapping(offsets, start: int, end: int) -> list[int]:
    """Indices of the tokens whose characters (``offsets``: the tokenizer's ``(a, b)`` per token)
    overlap the characters ``[start, end)``; empty tokens (specials, pads) never do."""
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]


def encode(tokenizer, text: str, *, subject: str | None = None, field: str) -> Encoded:
    """Tokenize `text` (with the tokenizer's special tokens) and locate `subject` in it.

    The subject is the set of tokens whose characters overlap its first occurrence.
    """
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = tuple(int(i) for i in enc["input_ids"])
    tokens = tuple(tokenizer.decode([i]) for i in ids)
    if subject is None:
        return Encoded(text, ids, tokens)
    start = text.find(subject)
    if start < 0:
        raise SpecError(f"{field}.subject", subject, f"a substring of the prompt {text!r}")
    end = start + len(subject)
    positions = tuple(overlapping(enc["offset_mapping"], start, end))
    if not positions:
        raise SpecError(f"{field}.subject", subject, f"text that covers at least one token of {text!r}")
    return Encoded(text, ids, tokens, positions)


def columns(selectors, enc: Encoded, field: str) -> list[tuple[str, tuple[int, ...]]]:
    """Expand position selectors into grid columns ``(label, positions)``.

    `all` gives one column per token (labelled by the token); `subject` one column
    holding every subject token; the rest one column of one position each.
    """
    n = len(enc)
    out: list[tuple[str, tuple[int, ...]]] = []
    for k, sel in enumerate(selectors):
        where = f"{field}[{k}]"
        if sel == "all":
            out.extend((enc.tokens[i], (i,)) for i in range(n))
        elif sel == "last":
            out.append(("last", (n - 1,)))
        elif isinstance(sel, int):
            if not -n <= sel < n:
                raise SpecError(where, sel, f"a position in [-{n}, {n - 1}] for {enc.text!r} ({n} tokens)")
            out.append((str(sel), (sel % n,)))
        else:
            if not enc.subject:
                raise SpecError(where, sel, "a position that needs no subject, or give the prompt a `subject`")
            pos = {"subject": enc.subject, "subject_first": enc.subject[:1], "subject_last": enc.subject[-1:]}[sel]
            out.append((sel, pos))
    return out


def check_aligned(base: Encoded, other: Encoded, field: str) -> None:
    """Patching and swapping copy states position by position: token counts must match."""
    if len(base) != len(other):
        raise SpecError(
            field, other.text,
            f"a prompt with the same number of tokens as {base.text!r} ({len(base)} tokens: {list(base.tokens)}); "
            f"it has {len(other)}: {list(other.tokens)}")


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the pad token, else end-of-sequence, else 0."""
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    return 0


def model_inputs(prompts: list[Encoded], pad_id: int, device=None, *, start: int = 0) -> dict:
    """The model's keyword inputs for `prompts` from position `start` on, right-padded: ``input_ids``,
    or ``inputs_embeds`` (padded with zeros) for prompts that carry embeddings, and ``attention_mask``; and
    ``context_ids`` and ``context_mask`` (right-padded) for prompts that carry a context."""
    if prompts[0].context:
        context = right_pad([p.context for p in prompts], pad_id, device)
        return {**model_inputs([replace(p, context=()) for p in prompts], pad_id, device, start=start),
                "context_ids": context["input_ids"], "context_mask": context["attention_mask"]}
    if prompts[0].embeds is None:
        return right_pad([p.ids[start:] for p in prompts], pad_id, device)
    width = max(len(p) for p in prompts) - start
    first = prompts[0].embeds
    embeds = first.new_zeros(len(prompts), width, first.shape[-1])
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        embeds[i, :len(p) - start] = p.embeds[start:]
        mask[i, :len(p) - start] = 1
    return {"inputs_embeds": embeds.to(device), "attention_mask": mask.to(device)}


def right_pad(seqs, pad_id: int, device=None) -> dict:
    """``input_ids`` and ``attention_mask`` with right padding.

    With causal attention the real positions never see the pads, so outputs there do
    not depend on the padding.
    """
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[*s] + [pad_id] * (width - len(s)) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], dtype=torch.long)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
