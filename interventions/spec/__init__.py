"""Specs: the typed, frozen objects a YAML file or Python code describes (`kinds`), reading them from files
with bounds (`file`), and the one-line messages for what a user got wrong (`messages`).

`interventions.spec` was one module before the layout of floors; its names still resolve here.
"""

from interventions.core.moved import forward

__getattr__ = forward('interventions.spec.kinds')
