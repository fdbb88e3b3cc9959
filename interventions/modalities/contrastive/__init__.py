"""Contrastive image-text models (CLIP): zero-shot classification as a model the engine runs, and the scenes testbed."""
