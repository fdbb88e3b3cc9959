"""Where the project's shipped files live: one place for the folder arithmetic.

>>> CHECKPOINTS.name, RECIPES.name
('checkpoints', 'recipes')
"""

from __future__ import annotations

from pathlib import Path

#: the project root (the folder holding interventions/, editors/, recipes/ and checkpoints/)
PROJECT = Path(__file__).resolve().parents[2]
#: shipped testbeds, deltas, lenses and vectors, with their manifest
CHECKPOINTS = PROJECT / "checkpoints"
#: YAML recipes, fact sets and figures
RECIPES = PROJECT / "recipes"
