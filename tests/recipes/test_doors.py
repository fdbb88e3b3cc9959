"""The doors issue "bad input" had not reached yet, each checked the way a careless or hostile user would
come through it: one `error:` line, exit 2, the folder around it byte for byte as it was, and the model's
weights bit for bit.

- A delta whose factors are finite but multiply to inf (u and v of 1e20 each, resealed so its hashes are
  right) is refused by `load_delta`, `Delta.from_factors`, `lesion apply` and `lesion export`; a finite
  change that would overflow the weight's own dtype is refused by `apply`.
- An export never adds the same delta twice (the same file twice, or two copies of it).
- A file `--out` (`lesion import`, `lesion export --to gguf`, `lesion train-lens`) never replaces what is
  there: an existing file, another delta, a symlink (dangling too) are refused before any work.
- `lesion import` takes only what PEFT itself would load with the same meaning: a negative rank (which
  flipped the edit's sign), a rank the tensors do not have (which scaled it by 1e-12), DoRA magnitudes and
  biases (which were dropped), malformed configs and weight files (which crashed), and a FIFO for a config
  (which hung) are each refused with one line.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from editors.delta import META_KEY, Delta, DeltaError, apply, content_hash, integrity_hash, load_delta
from interventions.core.atomic import atomic_save_file
from recipes.cli import main
from support.models import make_model

DOWN = "model.layers.1.mlp.down_proj.weight"


def one_error(err: str) -> str:
    """The run's one `error:` line (a model load may have drawn a progress bar before it), no traceback."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in err and sum(line.startswith("error:") for line in lines) == 1, err
    assert lines[-1].startswith("error:"), err
    return lines[-1]


def listing(folder: Path) -> dict[str, str]:
    """Every path under `folder` with its bytes' sha256 (a link: where it points)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        out[key] = f"-> {p.readlink()}" if p.is_symlink() else \
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(model, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.fixture()
def small(tiny_folder, tokenizer):
    """The tiny Llama folder, and a real rank-one delta on it saved as small.safetensors."""
    model = make_model("llama", len(tokenizer))
    out, inner = model.get_parameter(DOWN).shape
    delta = Delta.from_factors(model, {DOWN: (torch.full((out, 1), 0.01), torch.full((1, inner), 0.01))},
                               method="test", base_model=str(tiny_folder / "tiny"))
    delta.save(tiny_folder / "small.safetensors")
    return tiny_folder, model


def resealed(path: Path, out: Path, scale: float) -> Path:
    """`path`'s delta with every factor multiplied by `scale`, its content and integrity hashes made right."""
    tensors = {k: v * scale for k, v in load_file(str(path)).items()}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    meta["content_sha256"] = content_hash(tensors)
    meta["integrity_sha256"] = integrity_hash(meta)
    return atomic_save_file(tensors, out, {META_KEY: json.dumps(meta, sort_keys=True)})


def test_factors_that_multiply_to_inf_are_refused_on_load_and_when_made(small):
    folder, model = small
    bad = resealed(folder / "small.safetensors", folder / "overflow.safetensors", 1e22)
    assert torch.isfinite(load_file(str(bad))[f"{DOWN}::u"]).all()          # each factor alone is finite
    with pytest.raises(DeltaError, match="multiply to inf"):
        load_delta(bad)
    u, v = (t * 1e22 for t in load_delta(folder / "small.safetensors").factors[DOWN])
    with pytest.raises(DeltaError, match="multiply to inf"):
        Delta.from_factors(model, {DOWN: (u, v)}, method="test", base_model="tiny")


@pytest.mark.parametrize("command", [
    ["apply", "--model", "{tiny}", "--delta", "{bad}", "--prompt", "the eiffel tower"],
    ["export", "{bad}", "--to", "peft", "--model", "{tiny}", "--out", "{folder}/adapter"],
    ["export", "{bad}", "--to", "gguf", "--model", "{tiny}", "--out", "{folder}/adapter.gguf"],
    ["export", "{bad}", "--merged", "--model", "{tiny}", "--out", "{folder}/merged"],
])
def test_the_cli_refuses_an_overflowing_delta_and_writes_nothing(small, command, capsys):
    folder, _ = small
    bad = resealed(folder / "small.safetensors", folder / "overflow.safetensors", 1e22)
    before = listing(folder)
    args = [a.format(tiny=folder / "tiny", bad=bad, folder=folder) for a in command]
    assert main(args) == 2
    assert "multiply to inf" in one_error(capsys.readouterr().err)
    assert listing(folder) == before


def test_apply_refuses_a_change_that_overflows_the_weights_dtype(tokenizer):
    model = make_model("llama", len(tokenizer)).half()
    out, inner = model.get_parameter(DOWN).shape
    delta = Delta.from_factors(model, {DOWN: (torch.full((out, 1), 300.0), torch.full((1, inner), 300.0))},
                               method="test", base_model="tiny")                # 90,000 > float16's 65,504
    before = weights(model)
    with pytest.raises(DeltaError, match="would hold inf or nan"):
        apply(model, delta)
    assert same(model, before)


@pytest.mark.parametrize("to", ["peft", "gguf"])
@pytest.mark.parametrize("copies", ["the same file twice", "two copies"])
def test_export_never_adds_one_delta_twice(small, to, copies, capsys):
    folder, _ = small
    first = folder / "small.safetensors"
    second = first if copies == "the same file twice" else Path(shutil.copy(first, folder / "copy.safetensors"))
    out = folder / ("twice.gguf" if to == "gguf" else "twice")
    before = listing(folder)
    assert main(["export", str(first), str(second), "--to", to, "--model", str(folder / "tiny"),
                 "--out", str(out)]) == 2
    assert "given 2 times" in one_error(capsys.readouterr().err)
    assert listing(folder) == before and not out.exists()


def out_cases(folder: Path) -> dict[str, Path]:
    """`--out` paths that already hold something: a user's file, another delta, a symlink to a file, a
    dangling symlink, a folder."""
    (folder / "notes.safetensors").write_text("my notes")
    shutil.copy(folder / "small.safetensors", folder / "other.safetensors")
    (folder / "link.safetensors").symlink_to(folder / "notes.safetensors")
    (folder / "dangling.safetensors").symlink_to(folder / "nowhere.safetensors")
    (folder / "taken.safetensors").mkdir()
    return {name: folder / f"{name}.safetensors" for name in ("notes", "other", "link", "dangling", "taken")}


@pytest.mark.parametrize("case", ["notes", "other", "link", "dangling", "taken"])
def test_import_and_train_lens_never_replace_an_existing_out(small, case, capsys):
    folder, _ = small
    target = out_cases(folder)[case]
    assert main(["export", str(folder / "small.safetensors"), "--to", "peft", "--model", str(folder / "tiny"),
                 "--out", str(folder / "adapter")]) == 0
    capsys.readouterr()
    before = listing(folder)
    for args in (["import", str(folder / "adapter"), "--model", str(folder / "tiny"), "--out", str(target)],
                 ["train-lens", "--model", str(folder / "tiny"), "--out", str(target), "--steps", "1"]):
        assert main(args) == 2
        assert one_error(capsys.readouterr().err).startswith("error: `--out`")
        assert listing(folder) == before


@pytest.mark.parametrize("case", ["notes", "link", "dangling"])
def test_gguf_export_never_replaces_an_existing_out(small, case, capsys):
    folder, _ = small
    target = folder / f"{case}.gguf"
    {"notes": lambda: target.write_text("my notes"),
     "link": lambda: target.symlink_to(folder / "small.safetensors"),
     "dangling": lambda: target.symlink_to(folder / "nowhere.gguf")}[case]()
    before = listing(folder)
    assert main(["export", str(folder / "small.safetensors"), "--to", "gguf", "--model", str(folder / "tiny"),
                 "--out", str(target)]) == 2
    assert one_error(capsys.readouterr().err).startswith("error: `--out`")
    assert listing(folder) == before


def _config(adapter: Path, **change) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in change.items():
        if value is _DROP:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def _tensors(adapter: Path, change) -> None:
    from safetensors.torch import save_file

    path = adapter / "adapter_model.safetensors"
    save_file(change(load_file(str(path))), str(path))


_DROP = object()
#: adapters PEFT would refuse, or load with another meaning: each must be refused by `lesion import`
BAD_ADAPTERS = {
    "negative r (would flip the edit's sign)": lambda a: _config(a, r=-1, lora_alpha=-1),
    "r far above the tensors' rank (would scale the edit by 1e-12)": lambda a: _config(a, r=10**12, lora_alpha=1),
    "r as text": lambda a: _config(a, r="1"),
    "r true": lambda a: _config(a, r=True),
    "no r": lambda a: _config(a, r=_DROP),
    "no lora_alpha": lambda a: _config(a, lora_alpha=_DROP),
    "lora_alpha as text": lambda a: _config(a, lora_alpha="big"),
    "factors of 1e20 each (a change of inf)": lambda a: _tensors(a, lambda t: {k: v * 1e22 for k, v in t.items()}),
    "DoRA magnitudes beside the weights": lambda a: _tensors(a, lambda t: {
        **t, next(iter(t)).replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(4)}),
    "a bias tensor": lambda a: _tensors(a, lambda t: {**t, "base_model.model.lm_head.bias": torch.ones(4)}),
    "lora_A without lora_B": lambda a: _tensors(a, lambda t: {k: v for k, v in t.items() if "lora_B" not in k}),
    "lora_B of another rank": lambda a: _tensors(a, lambda t: {
        k: torch.cat([v, v], 1) if "lora_B" in k else v for k, v in t.items()}),
    "config is a list": lambda a: (a / "adapter_config.json").write_text("[1, 2]"),
    "config is not JSON": lambda a: (a / "adapter_config.json").write_text("{r: 1"),
    "config is not UTF-8": lambda a: (a / "adapter_config.json").write_bytes(b"\xff\xfe{}"),
    "config is a FIFO": lambda a: ((a / "adapter_config.json").unlink(), __import__("os").mkfifo(a / "adapter_config.json")),
    "weights truncated": lambda a: (a / "adapter_model.safetensors").write_bytes(
        (a / "adapter_model.safetensors").read_bytes()[:100]),
    "weights are random bytes": lambda a: (a / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4),
    "no weights file": lambda a: (a / "adapter_model.safetensors").unlink(),
}


@pytest.mark.parametrize("damage", sorted(BAD_ADAPTERS))
def test_import_takes_only_what_peft_would_load_with_the_same_meaning(small, damage, capsys):
    folder, _ = small
    adapter = folder / "adapter"
    assert main(["export", str(folder / "small.safetensors"), "--to", "peft", "--model", str(folder / "tiny"),
                 "--out", str(adapter)]) == 0
    assert main(["import", str(adapter), "--model", str(folder / "tiny"), "--out", str(folder / "ok.safetensors")]) == 0
    capsys.readouterr()
    BAD_ADAPTERS[damage](adapter)
    before = {p.name for p in folder.iterdir()}
    assert main(["import", str(adapter), "--model", str(folder / "tiny"), "--out", str(folder / "back.safetensors")]) == 2
    assert one_error(capsys.readouterr().err).startswith("error: `")
    assert {p.name for p in folder.iterdir()} == before


@pytest.mark.parametrize("form", [["--to", "peft"], ["--merged"], ["--to", "peft", "--each"]])
def test_an_earlier_export_is_replaced_but_a_folder_the_user_added_to_is_not(small, form, capsys):
    """An export folder is a result like a run folder: exporting again replaces it whole (its marker lists
    what Lesion wrote); once the user adds a file, or changes one, it is refused and left as it is."""
    folder, _ = small
    args = ["export", str(folder / "small.safetensors"), *form, "--model", str(folder / "tiny"),
            "--out", str(folder / "adapter")]
    assert main(args) == 0
    first = listing(folder / "adapter")
    assert main(args) == 0 and listing(folder / "adapter").keys() == first.keys()
    capsys.readouterr()
    for change in (lambda: (folder / "adapter" / "notes.md").write_text("mine"),
                   lambda: (folder / "adapter" / "notes.md").unlink() or next(
                       p for p in sorted((folder / "adapter").rglob("*.json")) if p.name != ".lesion-output.json")
                   .write_text("{}")):
        change()
        before = listing(folder)
        assert main(args) == 2
        assert one_error(capsys.readouterr().err).startswith("error: `--out`")
        assert listing(folder) == before
