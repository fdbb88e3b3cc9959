"""Models spread over devices through accelerate (`device_map`) give the single-device results.

No second device exists here, so the map puts two of the four layers on "disk": accelerate
then keeps their weights on the meta device and its hooks load them for every forward
pass, exactly the machinery that spreads a model too large for one GPU.
"""

from __future__ import annotations

import pytest
import torch

from interventions import load_model, parse_spec, run
from support.models import make_model

TOL = 1e-5
MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
       "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
SPECS = {
    "trace": {"kind": "trace", "prompts": [{"prompt": "the eiffel tower is located in the city of",
                                            "subject": "eiffel tower"}], "samples": 3, "window": 3},
    "patch": {"kind": "patch", "metric": "logit_diff", "sites": ["block_output", "mlp_output", "mlp_key"],
              "prompts": [{"base": "the eiffel tower is located in the city of",
                           "source": "the colosseum tower is located in the city of"}]},
    "attribution": {"kind": "trace", "method": "attribution", "samples": 2,
                    "prompts": [{"prompt": "the colosseum is in the city of", "subject": "colosseum"}]},
}


@pytest.fixture(scope="module")
def spread(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny")
    model = make_model("llama", len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    dispatched, _ = load_model(str(folder), device_map=MAP, offload_folder=folder / "offload")
    return model, dispatched


def test_the_map_really_offloads(spread):
    _, dispatched = spread
    assert dispatched.hf_device_map == MAP
    assert dispatched.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    assert hasattr(dispatched.model.layers[1], "_hf_hook")


@pytest.mark.parametrize("kind", list(SPECS))
def test_device_map_equals_single_device(spread, tokenizer, kind):
    model, dispatched = spread
    spec = parse_spec({**SPECS[kind], "model": "tiny"})
    one, many = run(spec, model, tokenizer), run(spec, dispatched, tokenizer)
    for name, grid in one.grids.items():
        assert torch.allclose(grid.values, many.grids[name].values, atol=TOL, equal_nan=True)
    assert one.prompts[0]["answer_id"] == many.prompts[0]["answer_id"]


def test_cli_device_map(tmp_path, tokenizer, capsys):
    import json

    from recipes.cli import main

    make_model("llama", len(tokenizer)).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    spec = tmp_path / "trace.yaml"
    spec.write_text(json.dumps({**SPECS["trace"], "model": str(tmp_path / "tiny")}))
    args = ["run", str(spec), "--quiet", "--offload-folder", str(tmp_path / "offload")]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    assert main(args + ["--out", str(tmp_path / "many"), "--device-map", json.dumps(MAP)]) == 0
    one, many = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("one", "many"))
    for name in one["grids"]:
        a, b = (torch.tensor(r["grids"][name]["values"], dtype=torch.float64) for r in (one, many))
        assert torch.allclose(a, b, atol=TOL, equal_nan=True)
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "bad"), "--device-map", "everywhere"]) == 2
    err = capsys.readouterr().err
    assert "--device-map" in err and "'everywhere'" in err and "balanced" in err
