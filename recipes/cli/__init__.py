"""The `lesion` command line: `app` (the parser and `main`), one `cmd_<name>` module per subcommand, the
runners of `lesion run` (one per kind of spec and modality), and the checks made before anything loads.

>>> from recipes.cli import main
>>> main(["validate", "recipes/trace/trace_eiffel.yaml"])           # doctest: +SKIP
ok: trace spec (language), 1 prompt(s), model smollm2-135m
"""

from recipes.cli.app import main

__all__ = ["main"]
