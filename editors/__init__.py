"""The weight layer: rank-one editors (ROME, MEMIT), concept erasure and the Delta format.

Imports flow recipes -> editors -> interventions. The editors arrive with the
ROME/MEMIT and concept-erasure issues; this package holds no code yet.
"""
