"""Feature dictionaries (sparse autoencoders) and neurons as units of analysis and intervention.

- `dictionary`: the `Dictionary` (standard/ReLU, TopK, JumpReLU) and SAELens's on-disk format.
- `training`: training one on a model's activations, streamed under a memory bound, and its report.
- `splice`: dictionaries inside a forward pass (feature edits that keep the error; reconstruction splicing).
"""
