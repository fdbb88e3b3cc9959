"""What the tests share: `models` (tiny seeded models and a tokenizer), `reference` (the plain-hook
oracle), `diffusion` (tiny Stable-Diffusion-shaped pipelines), `fuzzing` (generators of bad input),
`golden` (the frozen recipe outputs), `import_graph` (the layout's import rules) and `memory_probe`
(a sweep in a fresh process). Imported as `from support.<module> import ...`: tests/ is on sys.path
because tests/conftest.py lives there."""
