"""Synthetic worlds whose truth is known, for showing what the methods find: `shapes` (one coloured shape
per image), `scenes` (several objects with colour, shape, size, position and count) and `flags` (the
countries' flags the vision-language testbed names). Each image world ships an evaluator behind one
protocol, `Evaluator`: the text-to-image code asks only whether each image shows a word.

>>> from interventions.testbeds import shapes
>>> isinstance(shapes.Evaluator.__new__(shapes.Evaluator), Evaluator)
True
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Evaluator(Protocol):
    """Judges generated images: ``shows(images [n, 3, H, W] in [0, 1], word) -> Bool[Tensor, "n"]``,
    whether each image shows the concept `word` (a colour or a shape of its world)."""

    def shows(self, images: torch.Tensor, word: str) -> torch.Tensor: ...
