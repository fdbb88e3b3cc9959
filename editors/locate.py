"""Pick the edit layer(s) from a causal trace: `layer: auto` (ROME) and `layers: auto` (MEMIT).

ROME (Meng et al. 2022, §2) edits the MLP whose restoration at the subject's last token has
the largest indirect effect; MEMIT (Meng et al. 2023, §4) spreads edits over the critical range
of such layers. Both are read here from one trace of every request's prompt with `target_true`
as the answer, MLP sites only, at one position column, averaged over the requests.

>>> found = locate_layers(model, tokenizer, spec.requests, LocateSpec(), model_name="smollm2-135m")  # doctest: +SKIP
>>> found.layer, found.effect[:3]                                                                      # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interventions import run
from interventions.engine.result import Result
from interventions.spec import LocateSpec, TracePrompt, TraceSpec, VLMTracePrompt, VLMTraceSpec


@dataclass
class Located:
    layer: int                  #: the layer with the largest mean indirect effect
    layers: tuple[int, ...]     #: the `span` consecutive layers with the largest summed effect
    effect: list[float]         #: mean indirect effect per layer (the MLP window centred there)
    result: Result              #: the trace itself (save it for the heatmap)

    def summary(self) -> dict:
        return {"layer": self.layer, "layers": list(self.layers), "effect": self.effect,
                "position": self.result.spec.positions[0], "window": self.result.spec.window,
                "prompts": [p["prompt"] for p in self.result.prompts]}


def trace_spec(requests, how: LocateSpec, *, model_name: str) -> TraceSpec:
    """The trace behind `auto`: each request's filled-in prompt, answer `target_true`."""
    prompts = [TracePrompt(prompt=r.prompt.replace("{}", r.subject), subject=r.subject, target=r.target_true)
               for r in requests]
    return TraceSpec(model=model_name, prompts=tuple(prompts), sites=("mlp",), positions=(how.position,),
                     window=how.window, samples=how.samples, noise=how.noise, sigma=how.sigma, seed=how.seed)


def best_span(effect: torch.Tensor, span: int) -> tuple[int, ...]:
    """The `span` consecutive layers with the largest summed effect (ties: the earliest)."""
    span = min(span, len(effect))
    sums = effect.unfold(0, span, 1).sum(-1)
    start = int(torch.argmax(sums))
    return tuple(range(start, start + span))


def locate_layers(model, tokenizer, requests, how: LocateSpec, *, model_name: str) -> Located:
    result = run(trace_spec(requests, how, model_name=model_name), model, tokenizer, progress=False)
    effect = result.indirect_effect("mlp")[:, :, 0].mean(0)
    return Located(layer=int(torch.argmax(effect)), layers=best_span(effect, how.span),
                   effect=[round(float(x), 6) for x in effect], result=result)


def locate_image_layer(spec, vlm, tokenizer, processor=None) -> tuple[int, Result]:
    """`layer: auto`: the MLP window that restores p(`target_true`) most when every image token's
    MLP output is restored at once, under image noise, averaged over the edit questions."""
    how = spec.locate
    trace_spec = VLMTraceSpec(model=spec.model, corruption="noise", noise=how.noise, samples=how.samples,
                              seed=how.seed, sites=("mlp",), window=how.window, image_cells="block",
                              prompts=tuple(VLMTracePrompt(image=spec.image, prompt=q, target=spec.target_true)
                                            for q in spec.questions))
    result = run(trace_spec, vlm, tokenizer, processor=processor)
    grid = result.grids["mlp"].values
    effect = torch.stack([grid[i, :, r["image_column"]] for i, r in enumerate(result.prompts)]).mean(0)
    result.meta["effect"] = effect.tolist()
    return int(effect.argmax()), result
