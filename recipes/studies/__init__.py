"""Studies behind the README's findings: tuning, method comparisons, curves."""
