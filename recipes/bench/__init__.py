"""Benchmarks (`lesion bench-*`): each ends with one JSON line of its figures."""
