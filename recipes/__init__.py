"""End-to-end jobs for users: YAML recipes grouped by use, the `lesion` CLI (`cli/`), what each kind of
run writes (`jobs/`), benchmarks (`bench/`), studies (`studies/`) and testbed trainers (`train/`)."""

from interventions.core.moved import install

install()
