"""Trainers of the shipped testbeds and lenses, the fact-set miner, and the checkpoint manifest."""
