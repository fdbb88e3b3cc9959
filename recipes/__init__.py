"""End-to-end jobs for users: YAML recipes, the `lesion` CLI and benchmarks."""
