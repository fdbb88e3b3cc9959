"""Lenses: logit and tuned lens, attention knockout, linear probes, steering vectors."""
