"""Synthetic worlds with known truth: coloured shapes, scenes and flags."""
