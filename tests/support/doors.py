"""Seeded bad input for the doors beyond the spec file: request files, side files, images, tuned
lenses, steering vectors, probes, results given to `compare`, seeds and sizes, and `--out` paths.

    python tests/support/doors.py [SEED]     # builds a workspace, runs every case, prints the tallies

Each case is invalid by construction and goes through the command line, in-process, the way a user
would meet it. Its verdict is one of:
- ``clean``: exit status 2, one `error:` line as the last line, no traceback, and every file in the
  workspace (models included) byte for byte as before;
- ``traceback``: an exception escaped, or a traceback was printed;
- ``accepted``: the command succeeded (exit 0);
- ``changed``: refused, but a file in the workspace was written, replaced or removed;
- ``hang``: no answer within `TIMEOUT` seconds (a pipe read, say);
- ``unclean``: any other exit (several lines, another status).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import signal
import struct
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).parents[1]))      # tests/, for `support`
sys.path.insert(0, str(Path(__file__).parents[2]))      # the project

TIMEOUT = 60
#: Values no text field of a record accepts.
NOT_TEXT = [None, 7, 2.5, True, [], {}, ["Paris"], {"str": 1}]


@dataclass
class Case:
    surface: str
    name: str
    make: Callable[[Path], list[str]]      # writes the bad input into the workspace; returns lesion's argv


@dataclass
class Verdict:
    kind: str
    detail: str = ""


# ------------------------------------------------------------------------------------------- the workspace
def build_workspace(ws: Path) -> None:
    """Tiny models and one valid file of every kind the cases damage."""
    import torch
    from PIL import Image

    from interventions.lenses.lens import TunedLens
    from interventions.lenses.steering import estimate
    from interventions.modalities.vision_language.llava import VisionSpec, assemble_llava
    from recipes.cli import main
    from support.models import make_model, make_tokenizer

    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer))
    model.save_pretrained(ws / "tiny")
    tokenizer.save_pretrained(ws / "tiny")
    vlm, vlm_tokenizer = assemble_llava(make_model("llama", len(tokenizer)), make_tokenizer(),
                                        VisionSpec(hidden_size=24, intermediate_size=48))
    vlm.save_pretrained(ws / "llava")
    vlm_tokenizer.save_pretrained(ws / "llava")
    good = ws / "good"
    good.mkdir()
    (good / "corpus.txt").write_text("the eiffel tower is in paris\n\nthe colosseum is in rome\n\n" * 20)
    (good / "text.txt").write_text("the eiffel tower is in paris and the colosseum is in rome. " * 4)
    (good / "heldout.json").write_text(json.dumps({"heldout_known": [
        {"prompt": "paris is the capital of", "answer": " france"}]}))
    (good / "requests.json").write_text(json.dumps([counterfact("the eiffel tower", "rome", "paris"),
                                                    counterfact("big ben", "paris", "london")]))
    (good / "zsre.json").write_text(json.dumps([{"subject": "big ben", "src": "where is big ben?", "alt": "paris",
                                                 "answers": ["london"], "rephrase": "big ben is where?"}]))
    vector = estimate(model, tokenizer, ["paris is in france", "the capital of france"],
                      ["rome is in italy", "the capital of italy"], layers=[1], model_name=str(ws / "tiny"))
    assert 0 < float(vector.vectors[1].abs().max()) < 100         # words the tiny tokenizer knows: a real vector
    vector.save(good / "vector.safetensors")
    TunedLens(32, [0, 1, 2], rank=4).save(good / "lens.safetensors")
    Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255)
                    .byte().numpy()).save(good / "image.png")
    (good / "trace.yaml").write_text(json.dumps(trace_spec(ws)))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["run", str(good / "trace.yaml"), "--out", str(good / "result"), "--quiet"]) == 0
        patch = good / "patch.yaml"
        patch.write_text(json.dumps({"kind": "patch", "model": str(ws / "tiny"), "prompts": [
            {"base": "big ben is in london", "source": "the colosseum is in rome"}]}))
        assert main(["run", str(patch), "--out", str(good / "patched"), "--quiet"]) == 0


def counterfact(subject: str, new: str, true: str) -> dict:
    return {"requested_rewrite": {"prompt": "{} is located in the city of", "subject": subject,
                                  "target_new": {"str": " " + new}, "target_true": {"str": " " + true}},
            "paraphrase_prompts": [f"where is {subject}"], "neighborhood_prompts": ["the tower is in"]}


def trace_spec(ws: Path, **extra) -> dict:
    return {"kind": "trace", "model": str(ws / "tiny"), "samples": 2, "window": 1,
            "prompts": [{"prompt": "the eiffel tower is located in the city of", "subject": "eiffel tower"}], **extra}


def edit_spec(ws: Path, **extra) -> dict:
    return {"kind": "edit", "model": str(ws / "tiny"), "method": "rome", "layer": 1, "mom2_tokens": 200,
            "corpus": [str(ws / "good" / "corpus.txt")], "hyperparameters": {"v_steps": 2},
            "requests": [{"prompt": "{} is located in the city of", "subject": "the eiffel tower",
                          "target_new": " rome", "target_true": " paris"}], **extra}


def run_spec(spec: dict) -> Callable[[Path], list[str]]:
    """A case that runs `spec` (paths in it relative to the workspace are made absolute)."""
    def make(case: Path) -> list[str]:
        (case / "spec.yaml").write_text(json.dumps(spec))
        out = [] if spec["kind"] == "apply" else ["--out", str(case / "out")]     # apply writes nothing
        return ["run", str(case / "spec.yaml"), *out, "--quiet"]
    return make


def with_file(name: str, content, spec_of: Callable[[Path], dict]) -> Callable[[Path], list[str]]:
    """A case that writes `content` (bytes, a callable of the workspace, or "fifo") to `name` in its
    folder and runs the spec `spec_of(path)` builds."""
    def make(case: Path) -> list[str]:
        path = case / name
        data = content(case.parents[1]) if callable(content) else content
        if data == "fifo":
            os.mkfifo(path)
        elif data == "folder":
            path.mkdir()
        elif data is not None:
            path.write_bytes(data)
        return run_spec(spec_of(path))(case)
    return make


# ------------------------------------------------------------------------------------------- damage
def damaged_bytes(data: bytes, rng: random.Random, n: int) -> list[tuple[str, bytes]]:
    """`n` truncations (strict prefixes) and `n` single-byte flips of `data`, at seeded offsets, plus
    empty, random bytes, and bytes that are not UTF-8."""
    out = [("empty", b""), ("random bytes", rng.randbytes(max(64, len(data) // 4))), ("not UTF-8", b"\xff\xfe\x00" + data)]
    for _ in range(n):
        at = rng.randrange(1, max(2, len(data) - 1))
        out.append((f"cut at {at}", data[:at]))
    for _ in range(n):
        at = rng.randrange(len(data))
        flipped = bytearray(data)
        flipped[at] ^= 1 << rng.randrange(8)
        out.append((f"bit flip at {at}", bytes(flipped)))
    return out


def json_damage(records, rng: random.Random, n: int, required: list[tuple]) -> list[tuple[str, bytes]]:
    """Structural damage to a JSON document: a required value replaced by a non-text, a required key
    removed (each at seeded choices), deep nesting, NaN, and a document of the wrong shape."""
    out = [("nested 50,000 deep", b"[" * 50000 + b"]" * 50000), ("NaN record", b"[NaN]"),
           ("a number", b"7"), ("a string", b'"requests"'), ("null", b"null")]
    for _ in range(n):
        path = rng.choice(required)
        doc = json.loads(json.dumps(records))
        holder = doc
        for key in path[:-1]:
            holder = holder[key]
        value = rng.choice(NOT_TEXT)
        holder[path[-1]] = value
        out.append((f"{'.'.join(map(str, path))} = {json.dumps(value)}", json.dumps(doc).encode()))
        doc = json.loads(json.dumps(records))
        holder = doc
        for key in path[:-1]:
            holder = holder[key]
        del holder[path[-1]]
        out.append((f"{'.'.join(map(str, path))} removed", json.dumps(doc).encode()))
    return out


def png_bytes(width: int, height: int, rows: bytes | None = None) -> bytes:
    """A PNG by hand: an RGB image of `width` × `height` (declared), its pixels `rows` (or zeros)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(rows if rows is not None else b"\0" * (1 + 3 * min(width, 64)) * min(height, 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def seal(meta: dict, tensors: dict) -> dict:
    """`meta` with its content and integrity hashes made right for `tensors` (the format's own hashes)."""
    from editors.delta import content_hash, integrity_hash

    body = {k: v for k, v in meta.items() if k not in ("content_sha256", "integrity_sha256")}
    body["content_sha256"] = content_hash(tensors)
    return {**body, "integrity_sha256": integrity_hash(body)}


def resealed_vector(change: Callable[[dict, dict], None]) -> Callable[[Path], bytes]:
    """The good vector with `change(meta, tensors)` applied and its hashes made right again."""
    def make(ws: Path) -> bytes:
        from safetensors import safe_open
        from safetensors.torch import save

        with safe_open(str(ws / "good" / "vector.safetensors"), "pt") as f:
            meta = json.loads(f.metadata()["lesion_steer"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        change(meta, tensors)
        return save(tensors, {"lesion_steer": json.dumps(seal(meta, tensors))})
    return make


def resealed_lens(change: Callable[[dict, dict], None]) -> Callable[[Path], bytes]:
    def make(ws: Path) -> bytes:
        from safetensors import safe_open
        from safetensors.torch import save

        with safe_open(str(ws / "good" / "lens.safetensors"), "pt") as f:
            meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
        change(meta, tensors)
        return save(tensors, seal(meta, tensors))
    return make


# ------------------------------------------------------------------------------------------- the cases
def request_cases(ws: Path, rng: random.Random) -> list[Case]:
    good = json.loads((ws / "good" / "requests.json").read_text())
    zsre = json.loads((ws / "good" / "zsre.json").read_text())
    rw = [(0, "requested_rewrite", k) for k in ("prompt", "subject")] + \
         [(0, "requested_rewrite", k, "str") for k in ("target_new", "target_true")] + \
         [(0, "paraphrase_prompts"), (0, "neighborhood_prompts")]
    damages = damaged_bytes(json.dumps(good).encode(), rng, 6) + json_damage(good, rng, 8, rw)
    damages += [(f"zsRE {name}", data) for name, data in json_damage(zsre, rng, 6, [
        (0, "subject"), (0, "src"), (0, "alt"), (0, "answers"), (0, "rephrase")])]
    damages += [("a pipe", "fifo"), ("a folder", "folder"), ("missing", None)]
    cases = []
    for name, data in damages:
        if data is not None and data != "fifo" and data != "folder" and _valid_requests(data):
            continue                          # a flip inside a text, say, leaves valid requests
        cases.append(Case("requests_from", name, with_file("requests.json", data, lambda p: edit_spec(
            ws, requests=[], requests_from={"path": str(p)}) | {"requests": []})))
    return cases


def _valid_requests(data: bytes) -> bool:
    """Whether `data` is still a valid requests file (a flip inside a text, say), judged here by the
    formats' definitions, not by Lesion's reader."""
    def texts(x) -> bool:
        return isinstance(x, list) and all(isinstance(t, str) for t in x)

    def record(r) -> bool:
        if not isinstance(r, dict):
            return False
        if "requested_rewrite" in r:
            rw = r["requested_rewrite"]
            return isinstance(rw, dict) and all(isinstance(rw.get(k), str) for k in ("prompt", "subject")) and all(
                isinstance(rw.get(k), dict) and isinstance(rw[k].get("str"), str) for k in ("target_new", "target_true")) \
                and texts(r.get("paraphrase_prompts", [])) and texts(r.get("neighborhood_prompts", []))
        return isinstance(r.get("src"), str) and isinstance(r.get("subject"), str) and r["subject"] in r["src"] \
            and isinstance(r.get("alt"), str) and texts(r.get("answers", [])) and bool(r.get("answers")) \
            and isinstance(r.get("rephrase", ""), str)

    try:
        records = json.loads(data.decode("utf-8"), parse_constant=lambda c: 1 / 0)
    except (ValueError, ZeroDivisionError, RecursionError):
        return False
    return isinstance(records, list) and bool(records) and all(record(r) for r in records)


def side_file_cases(ws: Path, rng: random.Random) -> list[Case]:
    sequential = {"batch_size": 1, "heldout": str(ws / "good" / "heldout.json"), "text": str(ws / "good" / "text.txt"),
                  "fluency_prompts": 1, "sample": 1}
    fields = {
        "corpus": lambda p: edit_spec(ws, corpus=[str(p)]),
        "sequential.heldout": lambda p: edit_spec(ws, sequential={**sequential, "heldout": str(p)}),
        "sequential.text": lambda p: edit_spec(ws, sequential={**sequential, "text": str(p)}),
    }
    bad = [("not UTF-8", b"\xff\xfe\xfa text"), ("a pipe", "fifo"), ("a folder", "folder"), ("missing", None),
           ("random bytes", rng.randbytes(256))]
    cases = [Case(field, name, with_file("side.txt", data, spec_of)) for field, spec_of in fields.items()
             for name, data in bad]
    cases += [Case("sequential.text", "empty", with_file("side.txt", b"  \n", fields["sequential.text"]))]
    for name, data in [("no heldout_known", b'{"facts": []}'), ("answer a number", json.dumps({"heldout_known": [
            {"prompt": "p", "answer": 7}]}).encode()), ("a list", b"[1]"), ("deep", b"[" * 5000 + b"]" * 5000),
            ("empty list", b'{"heldout_known": []}')]:
        cases.append(Case("sequential.heldout", name, with_file("side.json", data, fields["sequential.heldout"])))
    return cases


def image_cases(ws: Path, rng: random.Random) -> list[Case]:
    def vlm_trace(image: str) -> dict:
        return {"kind": "trace", "model": str(ws / "llava"), "samples": 2, "window": 1,
                "prompts": [{"image": image, "prompt": " the capital of", "target": "paris"}]}
    png = (ws / "good" / "image.png").read_bytes()
    damages = [(name, data) for name, data in damaged_bytes(png, rng, 5) if name != "not UTF-8"]
    damages += [("text named .png", b"not an image at all"), ("svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>'),
                ("declares 100000 x 100000", png_bytes(100000, 100000)), ("declares 0 x 5", png_bytes(0, 5)),
                ("IEND missing", png[:-12]), ("a pipe", "fifo"), ("a folder", "folder"), ("missing", None)]
    cases = [Case("image", name, with_file("image.png", data, lambda p: vlm_trace(str(p)))) for name, data in damages
             if not (name.startswith("bit flip") and _decodes(data))]
    for ref in ["flag:France@²", "flag:France@99999999999999999999999", "flag:", "flag:Atlantis", "flag:*@x",
                "flag:France@-1", "flag:France@ 3"]:
        cases.append(Case("image", ref, run_spec(vlm_trace(ref))))
    return cases


def _decodes(data: bytes) -> bool:
    """Whether a damaged PNG still decodes whole (a flip in a length the CRC does not cover, say), as
    Pillow alone judges it."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.convert("RGB")
        return True
    except Exception:     # noqa: BLE001 - any failure: not a picture
        return False


def lens_cases(ws: Path, rng: random.Random) -> list[Case]:
    def lens(p: Path) -> dict:
        return {"kind": "lens", "model": str(ws / "tiny"), "tuned": str(p),
                "prompts": [{"prompt": "the eiffel tower is located in the city of", "target": " paris"}]}
    data = (ws / "good" / "lens.safetensors").read_bytes()
    damages = [(n, d) for n, d in damaged_bytes(data, rng, 6) if n != "not UTF-8"]

    def drop(key):
        return lambda meta, tensors: meta.pop(key)

    def set_meta(key, value):
        return lambda meta, tensors: meta.__setitem__(key, value)

    def nan(meta, tensors):
        name = sorted(tensors)[0]
        tensors[name] = tensors[name].clone().fill_(float("nan"))

    def drop_tensor(meta, tensors):
        tensors.pop(sorted(tensors)[0])

    resealed = {"no d": drop("d"), "d not a number": set_meta("d", "wide"), "d huge": set_meta("d", "1000000000"),
                "layers not JSON": set_meta("layers", "[0,"), "layers beyond the model": set_meta("layers", "[0, 99]"),
                "layers empty": set_meta("layers", "[]"), "rank zero": set_meta("rank", "0"),
                "rank not a number": set_meta("rank", "x"), "another format": set_meta("format", "x"),
                "nan translator": nan, "a tensor missing": drop_tensor}
    damages += [(f"resealed, {n}", resealed_lens(c)) for n, c in resealed.items()]
    damages += [("no seal (older file)", _unsealed_lens), ("a pipe", "fifo"), ("a folder", "folder"),
                ("missing", None)]
    return [Case("tuned lens", n, with_file("lens.safetensors", d, lens)) for n, d in damages]


def _unsealed_lens(ws: Path) -> bytes:
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(ws / "good" / "lens.safetensors"), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if not k.endswith("_sha256")}
        return save({k: f.get_tensor(k) for k in f.keys()}, meta)


def vector_cases(ws: Path, rng: random.Random) -> list[Case]:
    def apply(p: Path, coef: float = 4.0) -> dict:
        return {"kind": "apply", "model": str(ws / "tiny"), "steer": str(p), "coef": coef, "max_new_tokens": 2,
                "prompts": ["the eiffel tower is"]}
    data = (ws / "good" / "vector.safetensors").read_bytes()
    damages = [(n, d) for n, d in damaged_bytes(data, rng, 6) if n != "not UTF-8"]

    def set_meta(key, value):
        return lambda meta, tensors: meta.__setitem__(key, value)

    def scale(by):
        def change(meta, tensors):
            for k in tensors:
                tensors[k] = tensors[k] * by
        return change

    def empty(meta, tensors):
        tensors.clear()
        meta["layers"] = []

    resealed = {"no site": lambda meta, tensors: meta.pop("site"), "site a number": set_meta("site", 3),
                "another site": set_meta("site", "nowhere"), "layers disagree": set_meta("layers", [0, 1]),
                "version 1": set_meta("format_version", 1), "values 1e30": scale(1e30), "no layers": empty,
                "layer beyond the model": lambda meta, tensors: (tensors.__setitem__("layer.9", tensors.pop(
                    "layer.1")), meta.__setitem__("layers", [9])),
                "layer ²": lambda meta, tensors: tensors.__setitem__("layer.²", tensors.pop("layer.1"))}
    damages += [(f"resealed, {n}", resealed_vector(c)) for n, c in resealed.items()]
    damages += [("a pipe", "fifo"), ("a folder", "folder"), ("missing", None)]
    cases = [Case("steering vector", n, with_file("vector.safetensors", d, apply)) for n, d in damages]
    good = str(ws / "good" / "vector.safetensors")
    cases += [Case("steering vector", f"coef {c:g}", run_spec(apply(Path(good), c))) for c in (1e30, -1e12)]
    return cases


def probe_cases(ws: Path, rng: random.Random) -> list[Case]:
    def probe(examples, **extra) -> dict:
        return {"kind": "probe", "model": str(ws / "tiny"), "examples": examples, **extra}
    ex = [{"prompt": f"the {w} is", "label": label} for w, label in
          [("eiffel tower", "paris"), ("louvre", "paris"), ("colosseum", "rome"), ("big ben", "london")]]
    return [Case("probe", name, run_spec(spec)) for name, spec in [
        ("a label with one example", probe(ex)),
        ("a 300-character label", probe([dict(e, label="x" * 300 if i < 2 else "y") for i, e in enumerate(ex)])),
        ("labels x-y and x y", probe([dict(e, label="x-y" if i < 2 else "x y") for i, e in enumerate(ex)])),
        ("group split with one group per label", probe([dict(e, label="a" if i < 2 else "b", group="g" if i < 2 else "h")
                                                       for i, e in enumerate(ex)], split="groups")),
        ("one label", probe([dict(e, label="a") for e in ex])),
    ]]


def compare_cases(ws: Path, rng: random.Random) -> list[Case]:
    result = ws / "good" / "result"
    tensors = (result / "result.safetensors").read_bytes()

    def pair(change: Callable[[Path], None]) -> Callable[[Path], list[str]]:
        def make(case: Path) -> list[str]:
            import shutil

            shutil.copytree(result, case / "b")
            change(case / "b")
            return ["compare", str(result), str(case / "b")]
        return make

    def write(name, data):
        return lambda b: (b / name).write_bytes(data)

    def swap(b: Path) -> None:
        import shutil

        shutil.rmtree(b)
        shutil.copytree(ws / "good" / "patched", b)

    def regrid(b: Path) -> None:
        from safetensors.torch import load_file, save_file

        t = load_file(str(b / "result.safetensors"))
        save_file({k: (v[..., :1].contiguous() if v.dim() > 1 else v) for k, v in t.items()}, str(b / "result.safetensors"))

    cases = [Case("compare", name, pair(write("result.safetensors", data)))
             for name, data in damaged_bytes(tensors, rng, 4) if not name.startswith("bit flip")]
    cases += [Case("compare", "result.json not JSON", pair(write("result.json", b"{"))),
              Case("compare", "result.safetensors missing", pair(lambda b: (b / "result.safetensors").unlink())),
              Case("compare", "a patch result against a trace", pair(swap)),
              Case("compare", "grids of another shape", pair(regrid)),
              Case("compare", "an empty folder", lambda case: (case.joinpath("b").mkdir(), ["compare", str(result),
                                                                                             str(case / "b")])[1])]
    return cases


def report_cases(ws: Path, rng: random.Random) -> list[Case]:
    """`lesion report` on damaged run folders: result.json (bytes and structure), spec.yaml, images, and
    `--compare` / RUN_DIR that are not runs. A refusal writes no report.html."""
    result = ws / "good" / "result"
    doc = json.loads((result / "result.json").read_text(encoding="utf-8"))
    grid = next(iter(doc["grids"]))

    def run_with(change: Callable[[Path], None], *extra: str) -> Callable[[Path], list[str]]:
        def make(case: Path) -> list[str]:
            import shutil

            shutil.copytree(result, case / "run")
            change(case / "run")
            return ["report", str(case / "run"), *extra]
        return make

    def write(name, data):
        return lambda run: (run / name).write_bytes(data)

    required = [("kind",), ("prompts",), ("grids",), ("prompts", 0, "columns"), ("prompts", 0, "prompt"),
                ("grids", grid, "values"), ("grids", grid, "layers"), ("grids", grid, "site")]
    damages = [(n, d) for n, d in damaged_bytes(json.dumps(doc).encode(), rng, 3) if not n.startswith("bit flip")]
    damages += json_damage(doc, rng, 6, required)
    cases = [Case("report", f"result.json {name}", run_with(write("result.json", data))) for name, data in damages]
    short_row = json.loads(json.dumps(doc))
    short_row["grids"][grid]["values"][0][0] = short_row["grids"][grid]["values"][0][0][:-1] + [1.0, 2.0]
    cases += [Case("report", "a grid row longer than its prompt", run_with(write("result.json", json.dumps(short_row).encode()))),
              Case("report", "spec.yaml not YAML", run_with(write("spec.yaml", b"kind: [unclosed"))),
              Case("report", "images.safetensors random bytes", run_with(write("images.safetensors", rng.randbytes(200)))),
              Case("report", "--compare an empty folder", lambda case: (case.joinpath("other").mkdir(),
                   ["report", str(result), "--compare", str(case / "other"), "--out", str(case / "r.html")])[1]),
              Case("report", "RUN_DIR missing", lambda case: ["report", str(case / "nothing")]),
              Case("report", "RUN_DIR holds no run", lambda case: (case.joinpath("empty").mkdir(),
                   ["report", str(case / "empty")])[1])]
    return cases


def number_cases(ws: Path, rng: random.Random) -> list[Case]:
    cases = [Case("seed", f"seed {s}", run_spec(trace_spec(ws, seed=s))) for s in (2**64, 2**70, -1, -(2**63) - 1)]
    for memory in ["9" * 40, "1e400", "99999999999 TB", "0.0000001", "-3MB", "nan", "inf"]:
        def make(case: Path, memory=memory) -> list[str]:
            return run_spec(trace_spec(ws))(case) + ["--memory", memory]
        cases.append(Case("--memory", memory, make))
    return cases


def out_cases(ws: Path, rng: random.Random) -> list[Case]:
    def trace_to(where: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
        def make(case: Path) -> list[str]:
            (case / "spec.yaml").write_text(json.dumps(trace_spec(ws)))
            return ["run", str(case / "spec.yaml"), "--out", str(where(case)), "--quiet"]
        return make

    def dangling(case: Path) -> Path:
        (case / "link").symlink_to(case / "nowhere")
        return case / "link"

    def under_a_file(case: Path) -> Path:
        (case / "notes.txt").write_text("mine")
        return case / "notes.txt" / "out"

    def link_to_result(case: Path) -> Path:
        (case / "link").symlink_to(ws / "good" / "result")
        return case / "link"

    def dangling_parent(case: Path) -> Path:
        (case / "link").symlink_to(case / "nowhere")
        return case / "link" / "out"

    def user_folder(case: Path) -> Path:
        (case / "mine").mkdir()
        (case / "mine" / "thesis.tex").write_text("mine")
        return case / "mine"

    def added_to_result(case: Path) -> Path:
        import shutil

        shutil.copytree(ws / "good" / "result", case / "r")
        (case / "r" / "notes.txt").write_text("mine")
        return case / "r"

    cases = [Case("--out", n, trace_to(f)) for n, f in [
        ("a dangling link", dangling), ("under a file", under_a_file), ("a link to a result", link_to_result),
        ("under a dangling link", dangling_parent), ("a folder of the user's", user_folder),
        ("a result with a file added", added_to_result)]]
    if os.geteuid() != 0:                     # root may write into a read-only folder: not bad input there
        def read_only(case: Path) -> Path:
            (case / "ro").mkdir()
            (case / "ro").chmod(0o555)
            return case / "ro" / "out"
        cases.append(Case("--out", "inside a read-only folder", trace_to(read_only)))
    return cases


SURFACES = [request_cases, side_file_cases, image_cases, lens_cases, vector_cases, probe_cases, compare_cases,
            report_cases, number_cases, out_cases]


def all_cases(ws: Path, seed: int = 0) -> list[Case]:
    rng = random.Random(seed)
    return [case for surface in SURFACES for case in surface(ws, rng)]


# ------------------------------------------------------------------------------------------- verdicts
def listing(folder: Path) -> dict[str, str]:
    """Every path under `folder` with its bytes' sha256 (a link: where it points; a pipe: 'fifo')."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_symlink():
            out[key] = f"-> {os.readlink(p)}"
        elif p.is_fifo():
            out[key] = "fifo"
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[key] = "dir"
    return out


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang


def judge(case: Case, ws: Path, index: int) -> Verdict:
    """Run one case in a fresh folder of the workspace; the verdict (see the module docstring)."""
    from recipes.cli import main

    folder = ws / "cases" / f"{index:03d}"
    folder.mkdir(parents=True)
    argv = case.make(folder)
    before = listing(ws)
    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:          # argparse's own refusal: its exit status, judged below
                code = exit_.code
    except _Hang:
        return Verdict("hang")
    except BaseException as exc:               # noqa: BLE001 - any escape is the finding
        return Verdict("traceback", f"{type(exc).__name__}: {str(exc)[:200]}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    text = err.getvalue()
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    if "Traceback" in text:
        return Verdict("traceback", text[-300:])
    if code == 0:
        return Verdict("accepted", out.getvalue()[-200:])
    if listing(ws) != before:
        changed = sorted(set(listing(ws).items()) ^ set(before.items()))
        return Verdict("changed", str(changed[:3])[:300])
    if code == 2 and lines and lines[-1].startswith("error:") and sum(x.startswith("error:") for x in lines) == 1:
        return Verdict("clean", lines[-1])
    return Verdict("unclean", f"exit {code}: {text[-300:]}")


def tally(ws: Path, seed: int = 0) -> tuple[Counter, list[tuple[Case, Verdict]]]:
    results = [(case, judge(case, ws, i)) for i, case in enumerate(all_cases(ws, seed))]
    return Counter(v.kind for _, v in results), results


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        os.environ["LESION_HOME"] = str(ws / "home")
        build_workspace(ws)
        counts, results = tally(ws, int(next((a for a in sys.argv[1:] if a.isdigit()), 0)))
        by_surface: dict[str, Counter] = {}
        for case, verdict in results:
            by_surface.setdefault(case.surface, Counter())[verdict.kind] += 1
            if verdict.kind != "clean" or "-v" in sys.argv:
                print(f"{verdict.kind:9} {case.surface} / {case.name}: {verdict.detail[:200]!r}")
        for surface, c in by_surface.items():
            print(f"{surface:16} {dict(c)}")
        print(json.dumps({"cases": len(results), **counts}))
