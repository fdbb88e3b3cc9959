"""The weight layer: edit methods (`methods/`: ROME, r-ROME, EMMET, MEMIT, AlphaEdit, concept erasure), the
`Editor` loop and sequential editing, key statistics, layer location, and the Delta format with its exports.

Imports flow recipes -> editors -> interventions.
"""

from interventions.core.moved import install

install()
