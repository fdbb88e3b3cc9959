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

from pathlib import Path

from interventions.core.errors import SpecError, short
from interventions.core.reading import parse_json, read_text


def _text_list(record: dict, key: str, where: str) -> list[str]:
    """An optional list of texts in a CounterFact or zsRE record; a string or a list of others is refused."""
    value = record.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{where}.{key}", value, "a list of texts")
    return value


def _counterfact(record: dict, where: str) -> dict:
    rw = record["requested_rewrite"]
    try:
        fields = {"prompt": rw["prompt"], "subject": rw["subject"], "target_new": rw["target_new"]["str"],
                  "target_true": rw["target_true"]["str"]}
    except (KeyError, TypeError):
        fields = None
    if fields is None or not all(isinstance(v, str) for v in fields.values()):
        raise SpecError(where, record, "a CounterFact record: requested_rewrite.{prompt, subject, "
                        "target_new.str, target_true.str}, each a text")
    return {**fields, "paraphrases": _text_list(record, "paraphrase_prompts", where),
            "neighbours": _text_list(record, "neighborhood_prompts", where)}


def _zsre(record: dict, where: str) -> dict:
    subject, src, alt = record.get("subject"), record["src"], record["alt"]
    if not isinstance(subject, str) or not isinstance(src, str) or subject not in src:
        raise SpecError(f"{where}.subject", subject, f"a substring of the zsRE question {short(src)}")
    if not isinstance(alt, str) or not alt.strip():
        raise SpecError(f"{where}.alt", alt, "the new answer, a non-empty text")
    answers = _text_list(record, "answers", where) or [record.get("pred")]
    if not isinstance(answers[0], str) or not answers[0].strip():
        raise SpecError(f"{where}.answers", record.get("answers"), "a list of the true answers (texts), or `pred`")
    rephrase = record.get("rephrase")
    if rephrase is not None and not isinstance(rephrase, str):
        raise SpecError(f"{where}.rephrase", rephrase, "a text (a paraphrase of the question)")
    return {"prompt": src.replace(subject, "{}", 1), "subject": subject, "target_new": " " + alt,
            "target_true": " " + answers[0], "paraphrases": [rephrase] if rephrase else []}


def _entry(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise SpecError(where, record, "a mapping (a CounterFact, zsRE or `requests` record)")
    if "requested_rewrite" in record:
        return _counterfact(record, where)
    if "src" in record and "alt" in record:
        return _zsre(record, where)
    return record


def read_requests(source, *, field: str = "requests_from") -> list:
    """The `EditRequestSpec`s a `RequestsFile` names (its split, offset and limit applied)."""
    from pydantic import ValidationError

    from interventions.spec import EditRequestSpec, load_yaml

    path = Path(source.path).expanduser()
    what = "a JSON or YAML file of edit requests (gzip-compressed if its name ends in .gz)"
    text = read_text(path, f"{field}.path", what, "json")
    if Path(path.name.removesuffix(".gz")).suffix == ".json":
        data = parse_json(text, f"{field}.path", source.path, what)
    else:
        data = load_yaml(text, source=f"{field}.path: {source.path}")
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
