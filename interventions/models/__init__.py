"""Models: loading by name (`loading`), what a name is (`families`), and the site tables that map site
names to module paths (`sites`).

`interventions.models` was one module before the layout of floors; its names still resolve here.
"""

from interventions.core.moved import forward

__getattr__ = forward('interventions.models.loading')
