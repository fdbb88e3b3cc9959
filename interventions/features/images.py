"""A vision-language model's images as a dictionary's data: the language model's states at the image
tokens, and the loss of each image's answer with the reconstruction spliced in there.

>>> items = [("flag:Japan@7", " Japan"), ("flag:France@3", " France")]
>>> d, report = train_dictionary(vlm, tokenizer, items, Where("block_output", 3, "llava-flags-smollm2"),
...                              read=image_reader(vlm, tokenizer, PROMPT),
...                              losses=answer_losses(vlm, tokenizer, PROMPT), features=512, k=8)  # doctest: +SKIP

Items are ``(image, answer)`` pairs: an image as the vision-language specs name one (``flag:<Country>@<seed>``
or a file) and the token the model should say after `prompt` (the flag testbed names the country). The
downstream loss is that answer's cross-entropy at the last position: clean, with the image tokens'
states replaced by the reconstruction (no error term), and with them zero-ablated; the loss recovered
is computed from these as for text.
"""

from __future__ import annotations

import torch

from interventions.core.conventions import answer_id
from interventions.core.prompts import model_inputs, pad_token_id
from interventions.core.runtime import eval_mode, input_device
from interventions.engine.pv import build_graph
from interventions.features.splice import Splice, component
from interventions.features.training import Losses, Read
from interventions.lenses.lens import prepare


def image_reader(model, tokenizer, prompt: str, processor=None) -> Read:
    """``(image, answer)`` items, each read at its image tokens, with `prompt` after the image."""
    def read(items: list) -> list:
        out = []
        for i, (ref, _) in enumerate(items):
            r = prepare(model, tokenizer, prompt, field=f"images[{i}]", processor=processor, image=ref, vision=True)
            out.append((r.enc, list(r.groups["image"])))
        return out
    return read


def answer_losses(model, tokenizer, prompt: str, processor=None, *, batch: int = 32) -> Losses:
    """The mean cross-entropy of each item's answer after `prompt`: clean, spliced and zero-ablated at the
    image tokens (see the module docstring)."""
    read = image_reader(model, tokenizer, prompt, processor)

    @torch.no_grad()
    def losses(d, items: list) -> dict[str, float]:
        where = component(model, d)
        sums = dict.fromkeys(("clean", "spliced", "zero"), 0.0)
        with eval_mode(model):
            graphs = {"spliced": build_graph(model, [(where, Splice(d, "reconstruct"))]),
                      "zero": build_graph(model, [(where, Splice(d, "zero"))])}
            for lo in range(0, len(items), batch):
                part = items[lo:lo + batch]
                got = read(part)
                encs = [e for e, _ in got]
                inputs = {**model_inputs(encs, pad_token_id(tokenizer), input_device(model)), "use_cache": False}
                answers = torch.tensor([answer_id(tokenizer, a, field=f"answers[{lo + i}]")
                                        for i, (_, a) in enumerate(part)])
                runs = {"clean": model(**inputs).logits}
                for name, graph in graphs.items():
                    _, out = graph(base=inputs, unit_locations={"base": [[keep for _, keep in got]]})
                    runs[name] = out.logits
                last = torch.tensor([len(e) - 1 for e in encs])
                for name, logits in runs.items():
                    rows = logits[torch.arange(len(encs)), last.to(logits.device)].float().cpu()
                    sums[name] += float(torch.nn.functional.cross_entropy(rows, answers, reduction="sum"))
        return {k: v / len(items) for k, v in sums.items()}
    return losses
