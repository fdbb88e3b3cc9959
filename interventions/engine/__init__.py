"""The engine: compiling a spec to a plan of pyvene graphs (`plan`, `pv`), running it (`execute`),
attribution patching (`attribution`), results (`result`, `assemble`, `compare`).

`interventions.engine` was one module before the layout of floors; its names still resolve here.
"""

from interventions.core.moved import forward

__getattr__ = forward('interventions.engine.execute')
