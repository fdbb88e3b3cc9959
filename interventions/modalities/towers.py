"""What every image tower's grid shares: an image as the sequence its tower reads (CLS, then the patches in
reading order), the positions' labels and the grid's columns over them.

>>> patch_labels(24, 8)
('CLS', 'p0,0', 'p0,1', 'p0,2', 'p1,0', 'p1,1', 'p1,2', 'p2,0', 'p2,1', 'p2,2')
>>> [label for label, _ in patch_columns(patch_labels(24, 12), "both")]
['CLS', 'p0,0', 'p0,1', 'p1,0', 'p1,1', 'patches×4']
"""

from __future__ import annotations

import torch

from interventions.core.prompts import Encoded


def patch_labels(image_size: int, patch_size: int) -> tuple[str, ...]:
    """``CLS`` and ``p<row>,<col>`` for each patch."""
    side = image_size // patch_size
    return ("CLS",) + tuple(f"p{r},{c}" for r in range(side) for c in range(side))


def patch_columns(tokens: tuple[str, ...], cells: str) -> list[tuple[str, tuple[int, ...]]]:
    """CLS, then each patch (`each`), all patches as one column (`block`), or both."""
    patches = tuple(range(1, len(tokens)))
    out = [("CLS", (0,))]
    if cells != "block":
        out += [(tokens[p], (p,)) for p in patches]
    if cells != "each":
        out.append((f"patches×{len(patches)}", patches))
    return out


def patch_sequence(label: str, config, embeds: torch.Tensor, context: tuple[int, ...] = ()) -> Encoded:
    """An image's tower input ``embeds (1 + patches, d)`` as the engine's prompt sequence: every position named,
    the patches its subject (what noise corrupts), `context` the text a language model reads with it."""
    tokens = patch_labels(config.image_size, config.patch_size)
    ids = tuple(range(len(tokens)))
    return Encoded(label, ids, tokens, ids[1:], embeds=embeds, context=tuple(context))
