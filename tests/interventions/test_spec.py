"""Specs: YAML round trips, the JSON Schema, and one clear error per kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from interventions import SpecError, compile_spec, dump_spec, load_spec, load_yaml, parse_spec, spec_schema
from interventions.models.sites import site_table

RECIPES = sorted((Path(__file__).parents[2] / "recipes").rglob("*.yaml"))
EIFFEL = {"prompt": "the eiffel tower is located in the city of", "subject": "eiffel tower"}

SPECS = [
    {"kind": "trace", "prompts": [EIFFEL]},
    {"kind": "trace", "model": "gemma3-270m", "prompts": [dict(EIFFEL, target=" paris", counterfactual_subject="big ben")],
     "corruption": "swap", "layers": [0, -1], "positions": ["subject", "last", 3, -2], "sites": ["mlp"],
     "window": 4, "sigma": 0.2, "samples": 3, "seed": 5, "max_batch_rows": 7},
    {"kind": "patch", "prompts": [{"base": "a b", "source": "c d", "target": " x", "counterfactual_target": " y",
                                   "subject": "a"}],
     "sites": ["mlp_key", "embed"], "metric": "kl", "positions": ["subject_first", "all"]},
]


@pytest.mark.parametrize("data", SPECS + [yaml.safe_load(p.read_text()) for p in RECIPES])
def test_spec_yaml_spec_is_identical(data):
    spec = parse_spec(data)
    text = dump_spec(spec)
    again = parse_spec(load_yaml(text))
    assert again == spec
    assert dump_spec(again) == text


def test_specs_are_frozen():
    spec = parse_spec(SPECS[0])
    with pytest.raises(Exception):
        spec.samples = 3


def test_recipes_validate_against_the_json_schema():
    import jsonschema
    schema = spec_schema()
    json.dumps(schema)
    for path in RECIPES:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"kind": "trace", "prompts": []}, schema)


def error_of(fn):
    with pytest.raises(SpecError) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("data, field, needle", [
    ({"kind": "trace", "prompts": []}, "`prompts`", "at least 1"),
    ({"kind": "trace", "prompts": [EIFFEL], "sites": ["hiden"]}, "`sites`", "did you mean 'hidden'"),
    ({"kind": "patch", "prompts": [{"base": "a", "source": "b"}], "sites": ["mlp_outptu"]}, "`sites`",
     "did you mean 'mlp_output'"),
    ({"kind": "trce", "prompts": [EIFFEL]}, "`kind`", "did you mean 'trace'"),
    ({"prompts": [EIFFEL]}, "`kind`", "'trace', 'patch'"),
    ({"kind": "trace", "prompts": [EIFFEL], "samples": 0}, "`samples`", "at least 1"),
    ({"kind": "trace", "prompts": [EIFFEL], "positions": ["middle"]}, "`positions[0]`", "'subject_last'"),
    ({"kind": "trace", "prompts": [EIFFEL], "noize": 3}, "`noize`", "unknown field"),
    ({"kind": "trace", "prompts": [{"prompt": "x"}]}, "`prompts[0].subject`", "this field is required"),
    ({"kind": "patch", "prompts": [{"base": "a", "source": "b"}], "metric": "kll"}, "`metric`", "'kl'"),
])
def test_bad_specs_name_the_field_and_value(data, field, needle):
    message = error_of(lambda: parse_spec(data))
    assert field in message and needle in message, message


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("kind: trace\nprompts: [\n  {prompt: a\n")
    message = error_of(lambda: load_spec(path))
    assert "malformed YAML at line" in message and str(path) in message


def test_missing_file():
    assert "an existing file, the YAML spec" in error_of(lambda: load_spec("/nonexistent/spec.yaml"))


@pytest.mark.parametrize("data, field, needle", [
    ({"kind": "trace", "prompts": [EIFFEL, {"prompt": "the colosseum is in rome", "subject": "paris"}]},
     "`prompts[1].subject`", "a substring of the prompt"),
    ({"kind": "trace", "prompts": [EIFFEL], "layers": [4]}, "`layers[0]`", "the model has 4 layers"),
    ({"kind": "trace", "prompts": [EIFFEL], "layers": [-5]}, "`layers[0]`", "[-4, 3]"),
    ({"kind": "trace", "prompts": [EIFFEL], "positions": [12]}, "`positions[0]`", "9 tokens"),
    ({"kind": "trace", "corruption": "swap", "prompts": [EIFFEL]}, "`prompts[0].counterfactual_subject`",
     "'swap'"),
    ({"kind": "trace", "corruption": "swap", "prompts": [dict(EIFFEL, counterfactual_subject="paris")]},
     "`prompts[0].counterfactual_subject`", "same number of tokens"),
    ({"kind": "patch", "prompts": [{"base": "the colosseum is in rome", "source": "big ben is in new york city"}]},
     "`prompts[0].source`", "same number of tokens"),
    ({"kind": "patch", "prompts": [{"base": "big ben is in london", "source": "the colosseum is in rome"}],
      "positions": ["subject"]}, "`positions[0]`", "give the prompt a `subject`"),
])
def test_bad_inputs_found_when_compiling(tiny_llama, data, field, needle):
    model, tokenizer = tiny_llama
    message = error_of(lambda: compile_spec(parse_spec(data), model, tokenizer))
    assert field in message and needle in message, message


def test_unknown_model_family_suggests_nearest(tiny_llama):
    model, _ = tiny_llama

    class Fake(type(model.config)):
        model_type = "lama"

    fake = type("FakeModel", (), {"config": Fake()})()
    message = error_of(lambda: site_table(fake))
    assert "`model`" in message and "'lama'" in message and "did you mean 'llama'" in message
