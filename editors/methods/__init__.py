"""Edit methods: ROME and r-ROME (`rome`), EMMET (`emmet`), MEMIT, AlphaEdit and ENCORE (`memit`),
UltraEdit (`ultraedit`), ROME at a
vision-language model's image tokens (`rome_vision_language`), and concept erasure in text-to-image
models (`erase`).

What a spec may say of each language-model method (its hyperparameter class, one layer or several, a
batch or one request at a time) is `interventions.spec.EDIT_METHODS`, below this package; how the
`Editor` computes one batch with it is `STEPS`, here. A test checks that the two name the same methods.

>>> sorted(STEPS)
['alphaedit', 'emmet', 'encore', 'memit', 'r-rome', 'rome', 'ultraedit']
"""

from editors.methods.emmet import emmet_step
from editors.methods.memit import memit_step
from editors.methods.rome import rome_step
from editors.methods.ultraedit import ultraedit_step

#: edit method -> step(editor, requests) -> (the batch's Delta, a detail row), on the model as it is now
STEPS = {"rome": rome_step, "r-rome": rome_step, "emmet": emmet_step, "memit": memit_step, "alphaedit": memit_step,
         "encore": memit_step, "ultraedit": ultraedit_step}
