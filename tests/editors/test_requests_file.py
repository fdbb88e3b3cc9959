"""Edit requests from a file (CounterFact, zsRE, Lesion's list) and the fact sets mined for the real models."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from editors.requests import resolve_requests
from interventions import SpecError, dump_spec, load_yaml, parse_spec

ROOT = Path(__file__).resolve().parents[2]
COUNTERFACT = {"case_id": 0, "split": "tune", "requested_rewrite": {
    "prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": {"str": " Rome"},
    "target_true": {"str": " Paris"}}, "paraphrase_prompts": ["Where is the Eiffel Tower? In"],
    "neighborhood_prompts": ["The Louvre is located in the city of"]}
ZSRE = {"subject": "Eiffel Tower", "src": "Which city is the Eiffel Tower in?", "alt": "Rome", "answers": ["Paris"],
        "rephrase": "In which city is the Eiffel Tower?", "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}


def _spec(path, **source):
    return parse_spec({"kind": "edit", "layer": 5, "requests_from": {"path": str(path), **source}})


def test_counterfact_zsre_and_lesion_records_read_alike(tmp_path):
    lesion = {"prompt": "{} is in", "subject": "Big Ben", "target_new": " Rome", "target_true": " London"}
    (tmp_path / "cf.json").write_text(json.dumps([COUNTERFACT, {**COUNTERFACT, "split": "eval"}, ZSRE]))
    (tmp_path / "mine.yaml").write_text("requests:\n  - " + json.dumps(lesion) + "\n")
    spec = resolve_requests(_spec(tmp_path / "cf.json"))
    cf, cf2, zs = spec.requests
    assert (cf.prompt, cf.subject, cf.target_new, cf.target_true) == (
        "{} is located in the city of", "The Eiffel Tower", " Rome", " Paris")
    assert cf.paraphrases == ("Where is the Eiffel Tower? In",) and cf.neighbours == ("The Louvre is located in the city of",)
    assert (zs.prompt, zs.target_new, zs.target_true, zs.neighbours) == ("Which city is the {} in?", " Rome", " Paris", ())
    assert spec.requests_from is None
    assert resolve_requests(_spec(tmp_path / "mine.yaml")).requests[0].subject == "Big Ben"
    # split, offset and limit
    assert len(resolve_requests(_spec(tmp_path / "cf.json", split="tune")).requests) == 1
    assert len(resolve_requests(_spec(tmp_path / "cf.json", split="eval")).requests) == 2     # zsRE has no split
    assert resolve_requests(_spec(tmp_path / "cf.json", offset=2, limit=5)).requests == (zs,)


def test_a_spec_with_a_requests_file_round_trips_through_yaml(tmp_path):
    spec = _spec(tmp_path / "x.json", split="eval", limit=10)
    assert parse_spec(load_yaml(dump_spec(spec))) == spec


def test_bad_requests_files_name_the_field(tmp_path):
    with pytest.raises(SpecError, match="give `requests`"):
        parse_spec({"kind": "edit", "layer": 5})
    with pytest.raises(SpecError, match=r"requests_from.path"):
        resolve_requests(_spec(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text(json.dumps([{"requested_rewrite": {"prompt": "no slot", "subject": "x",
                                                                          "target_new": {"str": " a"},
                                                                          "target_true": {"str": " b"}}}]))
    with pytest.raises(SpecError, match=r"requests_from\[0\]\.prompt"):
        resolve_requests(_spec(tmp_path / "bad.json"))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(SpecError, match="requests_from"):
        resolve_requests(_spec(tmp_path / "empty.json"))


@pytest.mark.parametrize("name, at_least, known", [("smollm2-135m.json", 1000, 50), ("gemma3-270m.json", 100, 10),
                                                   ("smollm2-135m-10k.json.gz", 10_000, 500)])
def test_the_shipped_fact_sets(name, at_least, known):
    """Made by recipes/train/make_facts.py: tune and eval disjoint by subject, held-out known facts about subjects
    no request uses, every request with paraphrases and neighbours; SmolLM2's eval splits hold 1,000+ and
    10,000+ requests, the larger set 500+ held-out known facts."""
    raw = (ROOT / "recipes" / "facts" / name).read_bytes()
    data = json.loads(gzip.decompress(raw) if name.endswith(".gz") else raw)
    requests = data["requests"]
    tune = {r["requested_rewrite"]["subject"] for r in requests if r["split"] == "tune"}
    evals = {r["requested_rewrite"]["subject"] for r in requests if r["split"] == "eval"}
    assert tune and evals and not tune & evals
    assert sum(r["split"] == "eval" for r in requests) >= at_least
    from recipes.train.make_facts import RELATIONS

    def subject_of(prompt: str, relation: str) -> str:
        before, after = RELATIONS[relation][1][0].split("{}")
        assert prompt.startswith(before) and prompt.endswith(after)
        return prompt[len(before):len(prompt) - len(after)]

    assert len(data["heldout_known"]) >= known
    held = {subject_of(k["prompt"], k["relation"]) for k in data["heldout_known"]}
    assert held and not held & (tune | evals)
    assert all(k["answer"].strip() == k["truth"].split()[0] for k in data["heldout_known"])
    for r in requests:
        rw = r["requested_rewrite"]
        assert rw["target_new"]["str"] != rw["target_true"]["str"]
        assert len(r["paraphrase_prompts"]) == 2 and r["neighborhood_prompts"]
        assert all(rw["subject"] in p for p in r["paraphrase_prompts"])
        assert rw["subject"] not in {subject_of(p, r["relation"]) for p in r["neighborhood_prompts"]}
    spec = resolve_requests(parse_spec({"kind": "edit", "layer": 5, "requests_from": {
        "path": str(ROOT / "recipes" / "facts" / name), "split": "tune", "limit": 3}}))
    assert len(spec.requests) == 3


def test_a_gzip_fact_file_reads_as_its_content_and_a_bad_archive_is_one_error(tmp_path, monkeypatch):
    """A name ending in .gz is read gzip-compressed, by the request reader and the held-out reader alike: the
    archive gives what the plain file gives. A stream that is not gzip, cut short, damaged, followed by more
    bytes, or that inflates past the size limit is one error naming `requests_from.path`."""
    from editors.sequential import read_heldout
    from interventions.core.reading import LIMITS

    plain = json.dumps({"requests": [COUNTERFACT, ZSRE],
                        "heldout_known": [{"prompt": "Paris is the capital of", "answer": " France"}]}).encode()
    whole = gzip.compress(plain, mtime=0)
    (tmp_path / "f.json").write_bytes(plain)
    (tmp_path / "f.json.gz").write_bytes(whole)
    assert resolve_requests(_spec(tmp_path / "f.json.gz")).requests == resolve_requests(_spec(tmp_path / "f.json")).requests
    assert read_heldout(tmp_path / "f.json.gz") == read_heldout(tmp_path / "f.json") == [("Paris is the capital of",
                                                                                           " France")]
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0xFF
    bad = {"not gzip": (plain, "intact"), "empty": (b"", "cut short"), "cut short": (whole[:-12], "cut short"),
           "damaged": (bytes(flipped), "intact"), "two streams": (whole + whole, "nothing after it"),
           "trailing bytes": (whole + b"junk", "nothing after it")}
    for name, (data, reason) in bad.items():
        (tmp_path / f"{name}.json.gz").write_bytes(data)
        with pytest.raises(SpecError) as err:
            resolve_requests(_spec(tmp_path / f"{name}.json.gz"))
        message = str(err.value)
        assert message.startswith("`requests_from.path`") and "gzip" in message and reason in message, (name, message)
        assert "\n" not in message
    monkeypatch.setitem(LIMITS, "json", len(plain) - 1)          # inflates one byte past the limit: refused
    with pytest.raises(SpecError, match=f"at most {len(plain) - 1:,} bytes once decompressed"):
        resolve_requests(_spec(tmp_path / "f.json.gz"))
    with pytest.raises(SpecError, match="sequential.heldout.*once decompressed"):
        read_heldout(tmp_path / "f.json.gz")
