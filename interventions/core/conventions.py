"""The conventions every causal trace shares (language models, VLMs, contrastive image towers, text-to-image text encoders), written once.

>>> window(0, 10, 30), window(15, 10, 30), window(29, 10, 30)
((0, 1, 2, 3, 4), (10, 11, 12, 13, 14, 15, 16, 17, 18, 19), (24, 25, 26, 27, 28, 29))
>>> noise_seed(0, "The Eiffel Tower is in", "Eiffel Tower") == noise_seed(0, "The Eiffel Tower is in", "Eiffel Tower")
True

- **Window.** A site restored "at layer L with window w" is restored in the layers
  ``[L − w//2, L + w − w//2)``, clipped at the model's first and last layer (ROME's rule). So
  near the edges the window is smaller, never shifted: centre 0 with window 10 restores layers
  0–4. Every window-based comparison across layers therefore compares the same layers.
- **Noise seed.** A prompt's corruption noise is drawn from a generator seeded by the sha256 of
  the spec's `seed` and the prompt's own identity (its text, the positions of its corrupted
  tokens, and its image's pixels if it has one; `interventions.engine.plan.Prompt.identity`): never from
  its index in the spec. A prompt traced alone or among others, in any order, gets the same
  noise; a text-only prompt gets the same noise through a VLM as through its language model. An image
  in a contrastive model's trace is keyed by its reference, its noised patches and its pixels.
- **Noise scale.** σ is the std of the corrupted input embeddings pooled over the spec's prompts
  (`interventions.engine.plan.subject_sigma`), for language models and VLMs alike (for a contrastive
  model: its patch embeddings).
- **Target tokenization.** A target (an answer whose probability is read) is tokenized as
  written, with no space added or stripped; its first token is scored, as ROME scores
  multi-token answers. Write `" Paris"` for the word after "is".
"""

from __future__ import annotations

import hashlib

from interventions.core.errors import SpecError


def window(layer: int, size: int, num_layers: int) -> tuple[int, ...]:
    """ROME's window of `size` layers centred on `layer`, clipped to ``[0, num_layers)``."""
    return tuple(range(max(0, layer - size // 2), min(num_layers, layer - (-size // 2))))


def noise_seed(seed: int, *identity) -> int:
    """A 63-bit seed from the spec's `seed` and what identifies one prompt (texts, or bytes such as an
    image's pixels), independent of the prompt's position among others."""
    digest = hashlib.sha256(str(seed).encode())
    for part in identity:
        digest.update(b"\0" + (part if isinstance(part, bytes) else str(part).encode()))
    return int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)


def pixels_identity(pixels) -> bytes:
    """The sha256 of an image's pixels (what its noise is keyed by, with the prompt's text)."""
    import torch

    return hashlib.sha256(pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).digest()


def noise_generator(seed: int, *identity):
    """A CPU `torch.Generator` seeded with `noise_seed(seed, *identity)`."""
    import torch

    return torch.Generator().manual_seed(noise_seed(seed, *identity))


def answer_id(tokenizer, target: str, *, field: str) -> int:
    """The first token of `target`, tokenized as written."""
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise SpecError(field, target, "text that tokenizes to at least one token")
    return int(ids[0])
