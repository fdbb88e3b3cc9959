"""Bad input never costs a traceback, a result or a weight: seeded fuzzing of spec files, command lines
and delta files, all in-process, plus property tests (hypothesis) of the schema and the YAML round trip.

Each case asserts a clean refusal (one `error:` line naming the field, exit status 2) and that nothing
was written or changed: the output folder, the files beside it, the model's weights.
"""

from __future__ import annotations

import doctest
import importlib
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from editors.delta import (
    FORMAT_VERSION,
    META_KEY,
    Delta,
    DeltaError,
    apply,
    content_hash,
    integrity_hash,
    load_delta,
)
from interventions.core.errors import LesionError
from interventions.spec import HYPERPARAMETERS, dump_spec, load_yaml, parse_spec, spec_schema
from recipes.cli import main
from support.fuzzing import fixed_file_cases, judge_spec, spec_cases
from support.models import make_model

ROOT = Path(__file__).resolve().parents[2]
DOWN = "model.layers.1.mlp.down_proj.weight"


# ----------------------------------------------------------------------------------------------- spec files
def test_five_hundred_bad_spec_files_are_refused_cleanly(tmp_path):
    cases = spec_cases(500, seed=0)
    bad = []
    for case in cases:
        verdict = judge_spec(case, tmp_path)
        if not verdict.clean:
            bad.append((case.name, verdict.traceback or ("accepted" if verdict.accepted else verdict.message)))
    assert len(cases) >= 500 and bad == []
    assert [p.name for p in tmp_path.iterdir()] == ["spec.yaml"]     # validating writes nothing


@pytest.mark.parametrize("name, needle", [
    ("deep-nesting", "nesting at most 32 levels"), ("alias-bomb", "aliases expanded"),
    ("huge-file", "at most 1,000,000 bytes"), ("huge-prompt", "at most 10,000 characters"),
    ("empty", "a mapping with a `kind:` field"), ("bool-window", "`window`: got True; expected an integer"),
    ("inf-noise", "`noise`: got inf; expected a finite number"), ("duplicate-layer", "got 'layer' (line 3)"),
])
def test_resource_bounds_and_strict_values_are_refused_for_their_reason(tmp_path, name, needle):
    (case,) = [c for c in fixed_file_cases() if c.name == name]
    verdict = judge_spec(case, tmp_path)
    assert verdict.clean and needle in verdict.message and len(verdict.message) < 400, verdict.message


@pytest.mark.parametrize("text, needle", [
    ("kind: trace\nprompts: [{prompt: a b, subject: a}]\nsamples: true\n", "`samples`"),
    ("kind: steer\nlayers: [1]\npairs: [{positive: a, negative: b}]\nprompts: [x]\nlexicon: [a]\n"
     "coefficients: [.nan]\n", "`coefficients[0]`"),
    ("kind: apply\ndeltas: [d]\nprompts: [x]\ncoef: .inf\n", "`coef`"),
    ("kind: erase\nconcepts: [{concept: red}]\nlam: .inf\n", "`lam`"),
    ("kind: trace\nprompts: [{prompt: '', subject: a}]\n", "`prompts[0].prompt`"),
    ("kind: edit\nlayer: 1\nrequests: [{prompt: '{} is', subject: a, target_new: b, target_true: c}]\n"
     "hyperparameters: {v_stpes: 5}\n", "did you mean 'v_steps'"),
    ("kind: trace\nmodel: shapes-diffusion\nattn_window: 2\nprompts: [{prompt: a red circle, subject: red}]\n",
     "add that line"),
    ("kind: patch\nmodality: vision-language\nprompts: [{base: a, source: b}]\n", "`prompts[0].image`"),
    ("kind: trace\nprompts: [{prompt: a b, subject: a}]\nmethod: attribution\nrule: lrp\n", "`rule`"),
    ("kind: trace\nprompts: [{prompt: a b, subject: a}]\nrule: relp\n", "`method: attribution`"),
])
def test_issue_examples_are_refused_on_one_line(text, needle):
    with pytest.raises(LesionError) as info:
        parse_spec(load_yaml(text))
    message = str(info.value)
    assert needle in message and "\n" not in message and "Tuple should have" not in message, message
    assert ".int" not in message and "literal[" not in message and "trace:language" not in message


def test_a_spec_type_comes_from_its_fields_not_the_model_name():
    vlm = parse_spec({"kind": "trace", "model": "my-org/any-name", "prompts": [
        {"image": "flag:France", "prompt": " The capital is", "target": " Paris"}]})
    text = parse_spec({"kind": "trace", "model": "llava-like-name", "prompts": [{"prompt": "a b", "subject": "a"}]})
    t2i = parse_spec({"kind": "trace", "modality": "text-to-image", "prompts": [{"prompt": "a red circle",
                                                                                   "subject": "red"}]})
    assert (vlm.modality, text.modality, t2i.modality) == ("vision-language", "language", "text-to-image")
    assert t2i.model == "shapes-diffusion"      # a diffusion spec without `model:` takes the testbed


# ------------------------------------------------------------------------------------------- the schema
def recipe_files():
    return sorted((ROOT / "recipes").rglob("*.yaml"))


def test_schema_matches_exactly_one_branch_for_every_recipe():
    import jsonschema

    schema = spec_schema()
    assert "oneOf" in schema and "anyOf" not in schema
    for path in recipe_files():
        data = load_yaml(path.read_text())
        matches = [b for b in schema["oneOf"] if jsonschema.Draft202012Validator(
            {**b, "$defs": schema["$defs"]}).is_valid(data)]
        assert len(matches) == 1, (path.name, matches)
        parse_spec(data)


def test_schema_requires_kind_and_lists_the_enumerations():
    schema = spec_schema()
    for ref in schema["oneOf"]:
        branch = schema["$defs"][ref["$ref"].rsplit("/", 1)[1]]
        assert "kind" in branch["required"]
    assert schema["$defs"]["TraceSpec"]["properties"]["sites"]["items"]["enum"] == ["hidden", "mlp", "attention"]
    assert "block_output" in schema["$defs"]["PatchSpec"]["properties"]["sites"]["items"]["enum"]
    assert "modality" in schema["$defs"]["DiffusionTraceSpec"]["required"]
    hyper = schema["$defs"]["EditSpec"]["properties"]["hyperparameters"]
    assert {"v_steps", "mom2_update_weight"} <= {k for s in hyper["anyOf"] for k in s["properties"]}


def test_the_spec_and_the_editors_name_the_same_methods_and_overrides():
    """One hyperparameter class per method serves both; the editors' step table names the same methods;
    `hyperparameters:` takes every field but those the spec's own fields set; AlphaEdit has no lambda."""
    from editors.methods import STEPS
    from interventions.spec.edit_specs import FROM_SPEC, overrides_schema

    assert set(HYPERPARAMETERS) == set(STEPS)
    for method, cls in HYPERPARAMETERS.items():
        assert set(overrides_schema(method)["properties"]) == set(cls.model_fields) - set(FROM_SPEC), method
    assert "mom2_update_weight" not in HYPERPARAMETERS["alphaedit"].model_fields


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis_jsonschema import from_schema  # noqa: E402


def _branch(name: str) -> dict:
    schema = spec_schema()
    return {**schema["$defs"][name], "$defs": schema["$defs"]}


@pytest.mark.parametrize("branch", ["TraceSpec", "PatchSpec", "SteerSpec", "EraseSpec", "VLMTraceSpec"])
def test_every_schema_valid_spec_validates_or_is_refused_cleanly(branch):
    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(from_schema(_branch(branch)))
    def check(data):
        try:
            spec = parse_spec(data)
        except LesionError as err:    # the schema cannot say everything (e.g. a subject inside its prompt)
            assert "\n" not in str(err) and "`" in str(err)
            return
        assert parse_spec(load_yaml(dump_spec(spec))) == spec     # and what validates round-trips

    check()


# ---------------------------------------------------------------------------------------- command lines
BAD_COMMAND_LINES = [
    (["--threads", "-1", "validate", "{spec}"], "--threads"),
    (["run", "{spec}", "--out", "{out}", "--threads", "0"], "--threads"),
    (["run", "{spec}", "--out", "{out}", "--max-batch-rows", "-3"], "--max-batch-rows"),
    (["run", "{spec}", "--out", "{out}", "--device", "bogus"], "--device"),
    (["run", "{spec}", "--out", "{out}", "--device", "cuda:7"], "--device"),
    (["run", "{spec}", "--out", "{out}", "--device-map", '{"model.layers.0": "gpu9"}'], "--device-map"),
    (["run", "{spec}", "--out", "{out}", "--device-map", "[1, 2"], "--device-map"),
    (["run", "{spec}", "--out", "{out}", "--memory", "-5GB"], "--memory"),
    (["run", "{spec}", "--out", "{out}", "--checkpoint", "../escape"], "--checkpoint"),
    (["run", "{spec}", "--out", "{file}"], "--out"),
    (["run", "{spec}", "--out", "{busy}"], "--out"),
    (["run", "{spec}"], "--out"),
    (["run", "{spec}", "--out", "{out}", "--model", ""], "`model`"),
    (["run", "{missing}", "--out", "{out}"], "`spec`"),
    (["run", "{folder}", "--out", "{out}"], "`spec`"),
    (["run", "{long}", "--out", "{out}"], "`spec`"),
    (["validate", "{latin1}"], "UTF-8"),
    (["validate", "{spec}", "--compile", "--model", "{folder}"], "`model`"),
    (["apply", "--prompt", ""], "--prompt"),
    (["apply", "--prompt", "x", "--coef", "nan"], "--coef"),
    (["apply", "--prompt", "x", "--delta", "{missing}"], "`deltas[0]`"),
    (["apply", "--prompt", "x", "--steer", "{missing}"], "`steer`"),
    (["apply", "--prompt", "x", "--apply-to", "middle"], "--apply-to"),
    (["apply", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["compare", "{missing}", "{out}"], "result"),
    (["bench-trace", "--samples", "0"], "--samples"),
    (["bench-erase", "--spec", "{spec}"], "`kind: erase`"),
    (["trace-flags", "--out", "{out}", "--countries", "Atlantis"], "--countries"),
    (["edit-flag", "--out", "{out}", "--country", "Atlantis"], "--country"),
    (["attribution-steps", "--out", "{file}"], "--out"),
    (["attribution-rules", "--out", "{file}"], "--out"),
    (["attribution-rules", "--out", "{out}", "--cases", "eiffel,atlantis"], "--cases"),
    (["nonsense"], "invalid choice"),
]


@pytest.fixture()
def scene(tmp_path):
    spec = tmp_path / "trace.yaml"
    spec.write_text("kind: trace\nprompts: [{prompt: The Eiffel Tower is in, subject: Eiffel Tower}]\n")
    (tmp_path / "a-file").write_text("not a folder")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("precious")
    (tmp_path / "latin1.yaml").write_bytes("kind: trace # caf\xe9\n".encode("latin-1"))
    (tmp_path / "folder").mkdir()
    return {"spec": str(spec), "out": str(tmp_path / "out"), "file": str(tmp_path / "a-file"), "busy": str(busy),
            "missing": str(tmp_path / "missing.safetensors"), "folder": str(tmp_path / "folder"),
            "long": str(tmp_path / ("x" * 300)), "latin1": str(tmp_path / "latin1.yaml")}


def listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("argv, needle", BAD_COMMAND_LINES, ids=[" ".join(a) for a, _ in BAD_COMMAND_LINES])
def test_bad_command_lines_get_one_error_line_and_change_nothing(scene, tmp_path, capsys, argv, needle):
    before = listing(tmp_path)
    try:
        code = main([scene.get(a.strip("{}"), a) if a.startswith("{") and a.endswith("}") else a for a in argv])
    except SystemExit as exit:      # argparse's own refusals
        code = exit.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err and needle in err, err
    assert listing(tmp_path) == before and "torch.distributed" not in err


def test_a_crash_mid_run_leaves_no_folder_and_keeps_an_earlier_result(scene, tmp_path, monkeypatch, capsys):
    import recipes.jobs.run_grid as jobs

    def crashing(spec, args, out):
        (out / "result.json").write_text("{half")
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "grid_job", crashing)     # the job RUNNERS[("trace", "language")] names
    assert main(["run", scene["spec"], "--out", scene["out"]]) == 130
    assert not Path(scene["out"]).exists() and not list(tmp_path.glob(".out*"))
    Path(scene["out"]).mkdir()
    (Path(scene["out"]) / "result.json").write_text('{"earlier": true}')
    assert main(["run", scene["spec"], "--out", scene["out"]]) == 130
    assert (Path(scene["out"]) / "result.json").read_text() == '{"earlier": true}'
    assert not list(tmp_path.glob(".out*"))


def test_validate_schema_and_help_import_neither_torch_nor_pyvene(scene):
    code = ("import sys; from recipes.cli import main; "
            f"codes = [main(['validate', {scene['spec']!r}]), main(['schema'])]; "
            "print(codes, 'torch' in sys.modules, 'pyvene' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout
    assert out.strip().endswith("[0, 0] False False"), out


# ------------------------------------------------------------------------------------------- delta files
@pytest.fixture()
def model(tokenizer):
    return make_model("llama", len(tokenizer))


def good_delta(model, path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    out, inp = dict(model.named_parameters())[DOWN].shape
    delta = Delta.from_factors(model, {DOWN: (torch.randn(out, 1, generator=g), torch.randn(1, inp, generator=g))},
                               method="rome", base_model="tiny-llama")
    return delta.save(path)


def resealed(path: Path, target: Path, edit_meta=None, edit_tensors=None, keep_integrity=False) -> Path:
    """A copy with its metadata or tensors changed *and the hashes recomputed*: what a buggy or diverged
    editor would write, as opposed to bytes damaged on disk."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    meta["content_sha256"] = content_hash(tensors)
    if edit_meta:
        edit_meta(meta)
    if not keep_integrity:
        meta["integrity_sha256"] = integrity_hash(meta)
    save_file(tensors, str(target), {META_KEY: json.dumps(meta)})
    return target


def damaged_deltas(path: Path, folder: Path, flips: int = 60, seed: int = 0) -> list[tuple[str, Path]]:
    data = path.read_bytes()
    rng = random.Random(seed)
    cases = []
    for i in range(flips):     # single-bit flips anywhere in the file (header and tensors)
        pos, bit = rng.randrange(len(data)), 1 << rng.randrange(8)
        target = folder / f"flip{i}.safetensors"
        target.write_bytes(data[:pos] + bytes([data[pos] ^ bit]) + data[pos + 1:])
        cases.append((f"flip byte {pos} bit {bit}", target))
    for name, blob in [("truncated", data[:-9]), ("appended", data + b"junk"), ("empty", b""),
                       ("header only", data[:64]), ("zeros", bytes(len(data)))]:
        (folder / f"{name}.safetensors").write_bytes(blob)
        cases.append((name, folder / f"{name}.safetensors"))

    def nan(t):
        t[f"{DOWN}::u"][0, 0] = math.nan

    def inf(t):
        t[f"{DOWN}::v"][0, 0] = math.inf

    def rename(t):
        t["model.layers.1.mlp.down_proj.weight::w"] = t.pop(f"{DOWN}::v")

    def drop_v(t):
        t.pop(f"{DOWN}::v")

    def reshape(t):
        t[f"{DOWN}::u"] = torch.zeros(3, 1)

    forged = {
        "nan factor, hashes recomputed": dict(edit_tensors=nan), "inf factor, hashes recomputed": dict(edit_tensors=inf),
        "unknown tensor name": dict(edit_tensors=rename), "u without v": dict(edit_tensors=drop_v),
        "wrong shape": dict(edit_tensors=reshape),
        "base_model edited": dict(edit_meta=lambda m: m.update(base_model="gemma3-270m"), keep_integrity=True),
        "fingerprint of another base": dict(edit_meta=lambda m: m["fingerprints"][DOWN].update(sha256="0" * 64)),
        "format version 1": dict(edit_meta=lambda m: m.update(format_version=1)),
        "format version 99": dict(edit_meta=lambda m: m.update(format_version=99)),
        "fingerprints not a mapping": dict(edit_meta=lambda m: m.update(fingerprints=[1, 2])),
        "shape not a list": dict(edit_meta=lambda m: m["fingerprints"][DOWN].update(shape="32x64")),
        "no integrity hash": dict(edit_meta=lambda m: m.pop("integrity_sha256", None), keep_integrity=True),
    }
    for name, how in forged.items():
        cases.append((name, resealed(path, folder / f"{name.replace(' ', '_')}.safetensors", **how)))
    for name, meta in [("metadata not JSON", "{not json"), ("metadata a list", "[1, 2]"),
                       ("metadata nested deep", "[" * 100_000 + "]" * 100_000)]:
        target = folder / f"{name.replace(' ', '_')}.safetensors"
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(target), {META_KEY: meta})
        cases.append((name, target))
    return cases


def test_damaged_deltas_are_refused_and_the_model_is_bit_identical(model, tmp_path):
    good = good_delta(model, tmp_path / "good.safetensors")
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    cases = damaged_deltas(good, tmp_path)
    assert len(cases) >= 80
    accepted = []
    for name, path in cases:
        try:
            apply(model, load_delta(path))
            accepted.append(name)
        except DeltaError as err:
            assert "\n" not in str(err) and len(str(err)) < 600, (name, str(err))
        assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items()), name
    assert accepted == []


def test_a_delta_is_sealed_over_its_metadata_and_refuses_non_finite_changes(model, tmp_path):
    path = good_delta(model, tmp_path / "d.safetensors")
    delta = load_delta(path)
    assert delta.meta["format_version"] == FORMAT_VERSION == 2 and len(delta.meta["integrity_sha256"]) == 64
    with pytest.raises(DeltaError, match="given twice"):
        apply(model, delta, delta)
    bad = Delta({DOWN: (delta.factors[DOWN][0] * math.nan, delta.factors[DOWN][1])}, {}, dict(delta.meta))
    with pytest.raises(DeltaError, match="nan or inf"):
        bad.save(tmp_path / "nan.safetensors")
    with pytest.raises(DeltaError, match="nan or inf"):
        Delta.from_factors(model, {DOWN: (delta.factors[DOWN][0] * math.inf, delta.factors[DOWN][1])},
                           method="rome", base_model="tiny-llama")
    assert not (tmp_path / "nan.safetensors").exists()


# ---------------------------------------------------------------------------------------------- doctests
@pytest.mark.parametrize("name", ["interventions.core.errors", "interventions.spec.file", "interventions.core.units",
                                  "interventions.spec.messages", "interventions.core.conventions", "interventions.core.reading",
                                  "interventions.spec.catalogue", "interventions.spec", "recipes.jobs.flag_checks", "recipes.cli.runners",
                                  "interventions.core.moved", "interventions.core.paths", "interventions.core.runtime",
                                  "interventions.models.families", "interventions.api", "interventions.testbeds",
                                  "editors.methods"])
def test_module_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
