"""Results: named-axis grids plus per-prompt records, saved as JSON, safetensors, YAML and a heatmap.

>>> result = run(spec, model, tokenizer)                       # doctest: +SKIP
>>> result.grids["hidden"].values[0, 5, 3]                     # prompt 0, layer axis 5, column 3  # doctest: +SKIP
>>> result.save("runs/eiffel")                                 # doctest: +SKIP
['result.json', 'result.safetensors', 'heatmap.png', 'spec.yaml']
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from interventions.core.atomic import atomic_save_file, atomic_write, finite_json
from interventions.spec import dump_spec, spec_to_dict

AXES = ("prompt", "layer", "position")


@dataclass
class Grid:
    """``values``: ``Float[Tensor, "prompt layer position"]``, NaN beyond each prompt's `lengths`. A feature
    grid's rows are features (`axis` "feature"; `layers` then holds the feature indices, all at `layer`). A
    `context` grid's columns are its prompts' ``context_columns`` (a VLM's text, beside image-tower grids)."""

    name: str
    site: str
    metric: str
    layers: list[int]
    values: torch.Tensor
    lengths: list[int]
    axis: str = "layer"
    layer: int | None = None
    context: bool = False

    def nested(self, values: torch.Tensor | None = None) -> list:
        """[prompt][layer][position] lists, each prompt cut to its own length."""
        values = self.values if values is None else values
        return [values[i, :, :n].tolist() for i, n in enumerate(self.lengths)]


@dataclass
class Result:
    kind: str
    model: str
    spec: object
    prompts: list[dict]
    grids: dict[str, Grid]
    meta: dict = field(default_factory=dict)

    def indirect_effect(self, name: str) -> torch.Tensor:
        """Restored minus corrupted probability (traces only)."""
        corrupted = torch.tensor([p["corrupted_prob"] for p in self.prompts])
        return self.grids[name].values - corrupted[:, None, None]

    def _repr_html_(self) -> str:
        """In Jupyter: this result's interactive report, inline (the page `lesion report` writes)."""
        from interventions.report import html_for_result

        return html_for_result(self)

    def to_dict(self) -> dict:
        from interventions.core import __version__

        grids = {}
        for name, grid in self.grids.items():
            grids[name] = {"site": grid.site, "metric": grid.metric, "axes": ["prompt", grid.axis, "position"]}
            grids[name].update({"layers": grid.layers} if grid.axis == "layer" else
                               {"layer": grid.layer, "features": grid.layers})
            if grid.context:
                grids[name]["columns"] = "context_columns"
            grids[name]["values"] = grid.nested()
            if self.kind == "trace":
                grids[name]["indirect_effect"] = grid.nested(self.indirect_effect(name))
        return {"kind": self.kind, "model": self.model, "spec": spec_to_dict(self.spec),
                "lesion_version": __version__, "meta": self.meta, "prompts": self.prompts, "grids": grids}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {name: g.values.contiguous() for name, g in self.grids.items()}
        if self.kind == "trace":
            out.update({f"{name}.indirect_effect": self.indirect_effect(name).contiguous() for name in self.grids})
            out["corrupted_prob"] = torch.tensor([p["corrupted_prob"] for p in self.prompts])
        out["clean_prob"] = torch.tensor([p["clean_prob"] for p in self.prompts])
        return out

    def save(self, out_dir: str | Path, *, heatmap: bool = True) -> list[str]:
        """Write result.json, result.safetensors, spec.yaml and heatmap.png into `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "result.json", json.dumps(finite_json(self.to_dict()), indent=1).encode())
        meta = {"axes": json.dumps(list(AXES)), "kind": self.kind, "model": self.model,
                "lengths": json.dumps(next(iter(self.grids.values())).lengths)}
        if any(g.context for g in self.grids.values()):
            meta["context_lengths"] = json.dumps(next(g for g in self.grids.values() if g.context).lengths)
        atomic_save_file(self.tensors(), out / "result.safetensors", meta)
        atomic_write(out / "spec.yaml", dump_spec(self.spec).encode())
        written = ["result.json", "result.safetensors", "spec.yaml"]
        if heatmap:
            from interventions.core.plot import heatmap as draw

            draw(self, out / "heatmap.png")
            written.append("heatmap.png")
        return written
