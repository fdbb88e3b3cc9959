"""Edit requests from a file (`requests_from:` in an edit spec): CounterFact, zsRE, or Lesion's own list.

>>> spec = resolve_requests(load_spec("recipes/edit/edit_facts_smollm2.yaml"))     # doctest: +SKIP
>>> len(spec.requests), spec.requests_from                                     # doctest: +SKIP
(100, None)

Formats, told apart record by record:
- CounterFact (Meng et al. 2022; `recipes/train/make_facts.py` writes it): ``requested_rewrite`` with
  ``prompt`` (``{}`` for the subject), ``subject``, ``target_new.str``, ``target_true.str``, and
  ``paraphrase_prompts`` / ``neighborhood_prompts``; an optional ``split`` (``tune`` / ``eval``).
- zsRE as MEMIT ships it: ``src`` (a question holding ``subject``), ``alt`` (the new answer),
  ``answers`` (the true ones), ``rephrase``. Answers get a leading space (they follow the question);
  zsRE's ``loc`` questions have their own answers, so they are not neighbourhood prompts here.
- Lesion's: entries of an edit spec's `requests` list.

A file is a JSON or YAML list of records, or a mapping with such a list under ``requests``.
"""

from __future__ import annotations

import json
from pathlib import Path

from interventions.core.errors import SpecError, short


def _entry(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise SpecError(where, record, "a mapping (a CounterFact, zsRE or `requests` record)")
    if "requested_rewrite" in record:
        rw = record["requested_rewrite"]
        try:
            return {"prompt": rw["prompt"], "subject": rw["subject"], "target_new": rw["target_new"]["str"],
                    "target_true": rw["target_true"]["str"],
                    "paraphrases": list(record.get("paraphrase_prompts", [])),
                    "neighbours": list(record.get("neighborhood_prompts", []))}
        except (KeyError, TypeError):
            raise SpecError(where, record, "a CounterFact record: requested_rewrite.{prompt, subject, "
                            "target_new.str, target_true.str}") from None
    if "src" in record and "alt" in record:
        subject, src = record.get("subject"), record["src"]
        if not isinstance(subject, str) or not isinstance(src, str) or subject not in src:
            raise SpecError(f"{where}.subject", subject, f"a substring of the zsRE question {short(src)}")
        answers = record.get("answers") or [record.get("pred", "")]
        rephrase = record.get("rephrase")
        return {"prompt": src.replace(subject, "{}", 1), "subject": subject, "target_new": " " + str(record["alt"]),
                "target_true": " " + str(answers[0]), "paraphrases": [rephrase] if isinstance(rephrase, str) else []}
    return record


def read_requests(source, *, field: str = "requests_from") -> list:
    """The `EditRequestSpec`s a `RequestsFile` names (its split, offset and limit applied)."""
    from pydantic import ValidationError

    from interventions.spec import EditRequestSpec, load_yaml

    path = Path(source.path).expanduser()
    if not path.is_file():
        raise SpecError(f"{field}.path", source.path, "an existing JSON or YAML file of edit requests")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else load_yaml(text, source=str(path))
    except json.JSONDecodeError as err:
        raise SpecError(f"{field}.path", source.path, f"valid JSON (line {err.lineno}: {err.msg})") from None
    records = data.get("requests") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise SpecError(f"{field}.path", source.path, "a list of requests, or a mapping with one under `requests`")
    if source.split != "all":
        records = [r for r in records if isinstance(r, dict) and r.get("split", "eval") == source.split]
    end = None if source.limit is None else source.offset + source.limit
    chosen = records[source.offset:end]
    if not chosen:
        raise SpecError(field, f"{source.path} (split {source.split}, offset {source.offset})",
                        f"a file with requests there; it has {len(records)} in that split")
    out = []
    for i, record in enumerate(chosen):
        where = f"{field}[{source.offset + i}]"
        try:
            out.append(EditRequestSpec.model_validate(_entry(record, where)))
        except ValidationError as err:
            e = err.errors()[0]
            raise SpecError(f"{where}.{'.'.join(str(x) for x in e['loc'])}", e.get("input"), e["msg"]) from None
    return out


def resolve_requests(spec):
    """`spec` with `requests_from` read into `requests` (after the spec's own) and cleared; a sequential
    run's held-out facts default to that file's (`sequential.heldout`)."""
    if getattr(spec, "requests_from", None) is None:
        return spec
    update = {"requests": (*spec.requests, *read_requests(spec.requests_from)), "requests_from": None}
    if getattr(spec, "sequential", None) is not None and spec.sequential.heldout is None:
        update["sequential"] = spec.sequential.model_copy(update={"heldout": spec.requests_from.path})
    return spec.model_copy(update=update)
