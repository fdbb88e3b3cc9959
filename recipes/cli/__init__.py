"""The `lesion` command line: the parser, one runner per kind of spec, and the checks before a run."""
