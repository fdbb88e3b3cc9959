"""Seeded generators of bad input (spec files, command lines, delta files) and the verdict on each case.

    python tests/support/fuzzing.py            # prints the tallies (cases, clean refusals, tracebacks, accepted)

Every case here is invalid by construction: a value of a type no branch of the field accepts, a
required field removed, an unknown field added, a kind or modality that does not exist, or a file
damaged at the YAML, text-encoding or byte level. A case passes when it is refused *cleanly*: one
Lesion error (`LesionError`), one line, a bounded message that names a field in backticks.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field

import yaml

#: One valid spec of every class; the mutations start from these.
SEEDS = {
    "trace": {"kind": "trace", "prompts": [{"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower"}]},
    "patch": {"kind": "patch", "prompts": [{"base": "Paris is in", "source": "Rome is in"}]},
    "edit-rome": {"kind": "edit", "layer": 3, "requests": [
        {"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": " Rome", "target_true": " Paris",
         "paraphrases": ["Where is {}?".replace("{}", "the Eiffel Tower")]}]},
    "edit-memit": {"kind": "edit", "method": "memit", "layers": [2, 3], "requests": [
        {"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": " Rome", "target_true": " Paris"}]},
    "steer": {"kind": "steer", "layers": [3], "pairs": [{"positive": "the sea", "negative": "the desert"}],
              "prompts": ["I went out"], "lexicon": ["sea"]},
    "apply": {"kind": "apply", "deltas": ["delta.safetensors"], "prompts": ["The Eiffel Tower is in"]},
    "trace-vlm": {"kind": "trace", "prompts": [{"image": "flag:France", "prompt": " The capital of this country is",
                                                "target": " Paris"}]},
    "patch-vlm": {"kind": "patch", "prompts": [{"image": "flag:France", "base": " The capital is",
                                                "source_image": "flag:Italy"}]},
    "edit-vlm": {"kind": "edit", "image": "flag:France", "layer": 4, "questions": [" The capital is"],
                 "target_new": " Rome"},
    "trace-diffusion": {"kind": "trace", "modality": "text-to-image", "prompts": [
        {"prompt": "a red circle", "subject": "red", "counterfactual_subject": "blue"}]},
    "erase": {"kind": "erase", "concepts": [{"concept": "red", "guide": "blue"}], "preserve": ["green"]},
    "apply-diffusion": {"kind": "apply", "modality": "text-to-image", "deltas": ["d.safetensors"],
                        "prompts": ["a red circle"]},
}
#: Values that no field of any spec accepts (strict types: no bool for numbers or texts, no nan/inf).
NEVER = [True, False, math.nan, math.inf, -math.inf, {"deep": {"er": [1]}}, [True], [math.nan],
         [{"x": 1}]]
#: Values no *text* field accepts, and none a number field accepts.
NOT_TEXT = ["", "   ", "\n\t", 7, 2.5]
NOT_NUMBER = ["3", "three", [1], ""]
LIST_FIELDS_OF_TEXT = {"prompts", "paraphrases", "neighbours", "lexicon", "targets",
                       "questions", "preserve", "templates", "fluency_prompts"}
TEXT_FIELDS = {"prompt", "subject", "target", "base", "source", "target_new", "target_true", "concept", "image",
               "positive", "negative", "model", "counterfactual_subject"}
NUMBER_FIELDS = {"samples", "noise", "window", "seed", "layer", "max_batch_rows", "coef", "lam", "images",
                 "max_new_tokens", "temperature", "mom2_tokens", "attn_window", "preserve_scale"}


@dataclass
class Case:
    name: str
    text: str | bytes                 # the spec file's content
    mutation: dict = field(default_factory=dict)


def _nested(spec: dict) -> list[tuple[list, dict]]:
    """(path, mapping) for the top level and the first item of each list of mappings."""
    out = [([], spec)]
    for key, value in spec.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            out.append(([key, 0], value[0]))
    return out


def _bad_values(key: str) -> list:
    values = list(NEVER)
    if key in TEXT_FIELDS:
        values += NOT_TEXT
    if key in NUMBER_FIELDS:
        values += NOT_NUMBER
    if key in LIST_FIELDS_OF_TEXT:
        values += [[""], ["  "], [5], "not a list"]
    return values


def spec_cases(n: int, seed: int = 0) -> list[Case]:
    """`n` invalid spec files made by seeded mutation of `SEEDS`, as YAML text (or bytes)."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        name = rng.choice(sorted(SEEDS))
        spec = copy.deepcopy(SEEDS[name])
        path, target = rng.choice(_nested(spec))
        op = rng.choice(["value", "value", "value", "drop", "unknown", "kind", "modality", "text"])
        key = rng.choice(sorted(target))
        if op == "value":
            target[key] = rng.choice(_bad_values(key))
        elif op == "drop":
            required = {"prompts", "prompt", "subject", "base", "source", "requests", "target_new", "target_true",
                        "concepts", "concept", "layers", "questions", "image", "positive", "negative", "deltas"}
            keys = sorted(k for k in target if k in required and not (name == "apply" and k == "deltas"))
            if not keys:
                target["zz_unknown"] = 1
            else:
                key = rng.choice(keys)
                del target[key]
        elif op == "unknown":
            target[rng.choice(["noize", "v_stpes", "layer_s", "zz", "Prompt", "kind_"])] = 1
        elif op == "kind":
            spec["kind"] = rng.choice(["traec", "", "Trace", "edits", 3, None, ["trace"]])
        elif op == "modality":
            spec["modality"] = rng.choice(["vision", "image", "", "text_to_image", 1, "vision-language"
                                           if name in ("patch", "steer", "erase") else "audio"])
        text = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)
        if op == "text":
            text = _damage_text(text, rng)
        cases.append(Case(f"{name}/{op}/{'.'.join(map(str, path + [key]))}", text, {"op": op}))
    return cases + fixed_file_cases()


def _damage_text(text: str, rng: random.Random) -> str | bytes:
    how = rng.choice(["duplicate", "latin1", "utf16", "tab", "binary", "bigint", "unclosed"])
    if how == "duplicate":
        first = text.splitlines()[0]
        return text + first + "\n"                 # `kind:` twice
    if how == "latin1":
        return text.encode() + "\n# caf\xe9\n".encode("latin-1")
    if how == "utf16":
        return text.encode("utf-16")
    if how == "tab":
        return text.replace("\n  ", "\n\t", 1) if "\n  " in text else "kind: trace\n\tprompts: []\n"
    if how == "binary":
        return bytes(rng.randrange(256) for _ in range(200))
    if how == "bigint":
        return text + "seed: " + "9" * 5000 + "\n"
    return text.replace("prompts:", "prompts: [", 1) if "prompts:" in text else "{kind: trace\n"


def fixed_file_cases() -> list[Case]:
    """The resource-bound cases, one each: nesting, an alias bomb, a huge file, a huge prompt."""
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
    return [
        Case("deep-nesting", "kind: trace\nprompts: " + "[" * 5000 + "]" * 5000 + "\n"),
        Case("alias-bomb", "kind: trace\n" + bomb),
        Case("huge-file", "kind: trace\n# " + "x" * 1_100_000 + "\n"),
        Case("huge-prompt", yaml.safe_dump({"kind": "trace", "prompts": [
            {"prompt": "a " * 300_000, "subject": "a"}]})),
        Case("empty", ""),
        Case("scalar", "42\n"),
        Case("list", "- kind: trace\n"),
        Case("bool-window", "kind: trace\nwindow: true\nprompts: [{prompt: a b, subject: a}]\n"),
        Case("inf-noise", "kind: trace\nnoise: .inf\nprompts: [{prompt: a b, subject: a}]\n"),
        Case("duplicate-layer", "kind: edit\nlayer: auto\nlayer: 4\nrequests: []\n"),
    ]


@dataclass
class Verdict:
    clean: bool
    accepted: bool = False
    traceback: str = ""
    message: str = ""


def judge_spec(case: Case, tmp_dir) -> Verdict:
    """Write the case to a file and validate it in-process, as `lesion validate` does."""
    from interventions.core.errors import LesionError
    from interventions.spec import load_spec

    path = tmp_dir / "spec.yaml"
    path.write_bytes(case.text if isinstance(case.text, bytes) else case.text.encode())
    try:
        load_spec(path)
    except LesionError as err:
        return clean_message(str(err))
    except Exception as err:   # noqa: BLE001 - any other exception is what the fuzzing looks for
        return Verdict(False, traceback=f"{type(err).__name__}: {str(err)[:200]}")
    return Verdict(False, accepted=True)


def clean_message(message: str) -> Verdict:
    """One line, bounded, naming a field in backticks."""
    ok = "\n" not in message and 0 < len(message) <= 3000 and "`" in message
    return Verdict(ok, message=message)


def tally(n: int = 500, seed: int = 0) -> dict:
    import tempfile
    from pathlib import Path

    counts = {"cases": 0, "clean": 0, "tracebacks": 0, "accepted_invalid": 0, "unclean_message": 0}
    with tempfile.TemporaryDirectory() as tmp:
        for case in spec_cases(n, seed):
            v = judge_spec(case, Path(tmp))
            counts["cases"] += 1
            counts["clean"] += v.clean
            counts["tracebacks"] += bool(v.traceback)
            counts["accepted_invalid"] += v.accepted
            counts["unclean_message"] += not v.clean and not v.traceback and not v.accepted
            if not v.clean:
                print(f"  {case.name}: {v.traceback or ('accepted' if v.accepted else v.message[:200])}")
    return counts


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    print(tally())
