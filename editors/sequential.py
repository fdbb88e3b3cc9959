"""Sequential editing measured as it goes: the curves the literature uses to show collapse.

    lesion run recipes/edit/sequential_smollm2_alphaedit.yaml --out runs/seq_alphaedit

A `kind: edit` spec with ``sequential: {batch_size: N, eval_every: K}`` edits its requests N at a
time, each batch computed on the model with the earlier batches applied (`editors.editor.Editor`).
Before the first batch, after every K batches and after the last, it measures the model as it is
then (`ScaleProbe`):

- efficacy: of all the edits so far, the share whose prompt prefers ``target_new`` to ``target_true``
  (mean log-probability of the target's tokens, as CounterFact);
- paraphrase, neighbourhood: the share of paraphrases preferring ``target_new``, and of neighbour
  prompts still preferring ``target_true``, over at most `sample` of the edits so far, evenly spaced;
- fluency: the n-gram entropy of generations from the subjects of the run's first requests;
- held-out accuracy: top-1 on facts the unedited model knows, which are never edited;
- perplexity of a fixed held-out text;
- ``delta_norm``: the largest ‖ΔW‖_F / ‖W₀‖_F over the edited matrices (`editors.delta.relative_norms`),
  how far the stacked edits have moved a weight from the base model.

At 0 edits the edit metrics are read on the run's requests before any edit (efficacy is then the
share the model already prefers, about 0). The run writes ``curves.json`` (one row per measurement,
with seconds spent editing so far), ``curves.png`` and the stacked ``delta.safetensors``, which
reproduces the sequential run when applied to the base model. At every measurement it also writes a
checkpoint (the stacked delta so far, AlphaEdit's earlier keys, the rows); a run that was stopped
continues from its staging folder with ``sequential: {resume: <folder>}`` and ends as the
uninterrupted run would.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from editors.delta import DeltaError, content_hash, integrity_hash, load_delta, relative_norms, unapplied, verify
from editors.evaluate import (
    fluency,
    greedy_continuations,
    ngram_entropy,
    perplexity,
    prefers_each,
    share_stating,
    text_perplexity,
    top1_accuracy,
)
from interventions.core.atomic import atomic_save_file, atomic_write
from interventions.core.errors import SpecError, short
from interventions.core.paths import RECIPES
from interventions.core.reading import read_json, read_safetensors, read_text
from interventions.spec import BATCH_METHODS, spec_to_dict

#: The held-out text whose perplexity the curves track, shipped with the fact sets.
DEFAULT_TEXT = RECIPES / "facts" / "heldout_text.txt"
#: What each measurement row holds, in the order of the figure's panels.
CURVE_METRICS = ("efficacy", "paraphrase", "neighbourhood", "fluency", "heldout_accuracy", "perplexity")
#: What it also holds with ``sequential.generation`` (`ScaleProbe.generation_row`): the same questions judged
#: on greedy continuations, and the continuations' fluency.
GENERATION_METRICS = ("gen_efficacy", "gen_paraphrase", "gen_neighbourhood", "gen_heldout", "gen_perplexity",
                      "gen_entropy")
#: The figure's panels: a title, the teacher-forced metric (solid) and its generation-based twin (dashed).
PANELS = (("efficacy", "efficacy", "gen_efficacy"), ("paraphrase", "paraphrase", "gen_paraphrase"),
          ("neighbourhood", "neighbourhood", "gen_neighbourhood"), ("held-out known facts", "heldout_accuracy",
                                                                    "gen_heldout"),
          ("fluency: n-gram entropy", "fluency", "gen_entropy"), ("perplexity of the held-out text", "perplexity", None),
          ("perplexity of generations (unedited model)", None, "gen_perplexity"),
          ("update norm |dW|/|W0|", "delta_norm", None))
#: Tokens of each greedy continuation judged for an answer, and of those judged for fluency.
ANSWER_TOKENS, FLUENCY_TOKENS = 12, 40


def batch_size(spec) -> int:
    """Requests per batch: `sequential.batch_size`; without it, one (ROME, r-ROME) or all (the others)."""
    if spec.sequential is not None:
        return spec.sequential.batch_size
    return len(spec.requests) if spec.method in BATCH_METHODS else 1


def evenly_spaced(items: list, k: int) -> list:
    """At most `k` of `items`, evenly spaced, first included."""
    if len(items) <= k:
        return list(items)
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)] if k > 1 else items[:1]


def read_heldout(path, field: str = "sequential.heldout") -> list[tuple[str, str]]:
    """``(prompt, answer)`` of the held-out known facts in a fact-set file (its ``heldout_known``)."""
    what = "a JSON file with a non-empty `heldout_known` list of {prompt, answer} facts (the fact sets in recipes/facts/ have one)"
    if path is None:
        raise SpecError(field, path, what)
    data = read_json(path, field, what)
    facts = data.get("heldout_known") if isinstance(data, dict) else None
    if not isinstance(facts, list) or not facts or not all(
            isinstance(f, dict) and isinstance(f.get("prompt"), str) and isinstance(f.get("answer"), str)
            and f["prompt"].strip() and f["answer"].strip() for f in facts):
        raise SpecError(field, path, what)
    return [(f["prompt"], f["answer"]) for f in facts]


def edit_asks(requests: list) -> list[tuple[str, str, str]]:
    """``(edit prompt, target_new, target_true)`` of each request: what efficacy asks."""
    return [(r.prompt.replace("{}", r.subject), r.target_new, r.target_true) for r in requests]


def share_preferring(model, tokenizer, asks: list[tuple[str, str, str]]) -> float | None:
    """The share of ``(prompt, first, second)`` where `first` is more probable than `second` after the
    prompt (all scored in one batched pass); None when there is nothing to ask."""
    if not asks:
        return None
    return sum(prefers_each(model, tokenizer, asks)) / len(asks)


@dataclass
class ScaleProbe:
    """What a sequential run measures after its batches; see the module's docstring."""

    heldout: list[tuple[str, str]]
    text: str
    fluency_prompts: list[str]
    sample: int
    generation: bool = False

    @classmethod
    def from_spec(cls, spec) -> "ScaleProbe":
        path = Path(spec.sequential.text) if spec.sequential.text else DEFAULT_TEXT
        text = read_text(path, "sequential.text", "a held-out text file")
        if not text.strip():
            raise SpecError("sequential.text", str(path), "a held-out text file with text in it (this one is empty)")
        return cls(read_heldout(spec.sequential.heldout), text,
                   [r.subject for r in spec.requests[: spec.sequential.fluency_prompts]], spec.sequential.sample,
                   spec.sequential.generation)

    def generation_row(self, model, tokenizer, some: list, unedited) -> dict:
        """The generation-based metrics (`editors.evaluate.states` judges each greedy continuation): over
        `some` edits, the shares of edit prompts and paraphrases stating ``target_new`` before
        ``target_true``, of neighbour prompts stating ``target_true`` before ``target_new``; the share of
        held-out facts (at most `sample`, evenly spaced) stating their answer; and, for greedy continuations of the fluency prompts, their
        n-gram entropy and their perplexity under the unedited model (`unedited()`: a context in which
        the model is the base model)."""
        asks = edit_asks(some)
        asks += [(p, r.target_new, r.target_true) for r in some for p in r.paraphrases]
        asks += [(p, r.target_true, r.target_new) for r in some for p in r.neighbours]
        asks += [(p, a, None) for p, a in evenly_spaced(self.heldout, self.sample)]
        texts = greedy_continuations(model, tokenizer, [a[0] for a in asks], max_new_tokens=ANSWER_TOKENS)
        bounds, row = [len(some), sum(len(r.paraphrases) for r in some), sum(len(r.neighbours) for r in some),
                       len(evenly_spaced(self.heldout, self.sample))], {}
        start = 0
        for key, n in zip(GENERATION_METRICS, bounds):
            row[key] = share_stating(texts[start:start + n], [(a, b) for _, a, b in asks[start:start + n]])
            start += n
        long = greedy_continuations(model, tokenizer, self.fluency_prompts, max_new_tokens=FLUENCY_TOKENS)
        row["gen_entropy"] = sum(ngram_entropy(t) for t in long) / len(long)
        with unedited():
            row["gen_perplexity"] = text_perplexity(model, tokenizer, self.fluency_prompts, long)
        return row

    def measure(self, model, tokenizer, edited: list, unedited=None) -> dict:
        row = {"efficacy": share_preferring(model, tokenizer, edit_asks(edited))}
        some = evenly_spaced(edited, self.sample)
        row["paraphrase"] = share_preferring(model, tokenizer, [(p, r.target_new, r.target_true) for r in some
                                                                for p in r.paraphrases])
        row["neighbourhood"] = share_preferring(model, tokenizer, [(p, r.target_true, r.target_new) for r in some
                                                                   for p in r.neighbours])
        row["fluency"] = fluency(model, tokenizer, self.fluency_prompts)
        row["heldout_accuracy"] = top1_accuracy(model, tokenizer, self.heldout)
        row["perplexity"] = perplexity(model, tokenizer, self.text)
        if self.generation:
            row.update(self.generation_row(model, tokenizer, some, unedited or nullcontext))
        return row


CHECKPOINT = "checkpoint.safetensors"        # the stacked delta of the edits so far
CHECKPOINT_STATE = "checkpoint.json"         # how many edits, the rows so far, the spec
CHECKPOINT_KEYS = "checkpoint_keys.safetensors"   # AlphaEdit's earlier keys (K_p K_p^T per layer)


def save_checkpoint(out: Path, spec, editor, done: int, rows: list[dict]) -> None:
    """After a measurement: what a later run needs to continue exactly from here (`sequential.resume`).
    The state names its delta and keys by content hash and is sealed by its own integrity hash."""
    if editor is None or editor.stacked is None:
        return
    editor.stacked.save(out / CHECKPOINT)
    keys = {f"previous.{k}": v.contiguous() for k, v in editor.previous.items()}
    atomic_save_file(keys, out / CHECKPOINT_KEYS)
    state = {"edits": done, "batches": len(editor.details), "rows": rows, "details": editor.details,
             "spec": checkpoint_spec(spec), "delta": editor.stacked.id, "keys": content_hash(keys)}
    state["integrity_sha256"] = integrity_hash(state)
    atomic_write(out / CHECKPOINT_STATE, json.dumps(state, indent=1).encode())


def checkpoint_spec(spec) -> dict:
    """The spec as a checkpoint records it: everything but where it resumes from."""
    data = spec_to_dict(spec) if not isinstance(spec, dict) else json.loads(json.dumps(spec))
    if isinstance(data.get("sequential"), dict):
        data["sequential"] = {k: v for k, v in data["sequential"].items() if k != "resume"}
    return json.loads(json.dumps(data))


#: The fields of checkpoint.json and their types.
STATE_FIELDS = {"edits": int, "batches": int, "rows": list, "details": list, "spec": dict, "delta": str,
                "keys": str, "integrity_sha256": str}


def _refuse(folder: Path, allowed: str):
    return SpecError("sequential.resume", str(folder), allowed)


def _read_state(folder: Path, spec) -> dict:
    """checkpoint.json, whole and sealed, of this same spec, with an edit count this run can reach."""
    what = f"the staging folder of an interrupted sequential run, holding {CHECKPOINT_STATE} and {CHECKPOINT}"
    if not folder.is_dir():
        raise _refuse(folder, what)
    state = read_json(folder / CHECKPOINT_STATE, "sequential.resume", f"{CHECKPOINT_STATE} of {what}")
    bad = [k for k, t in STATE_FIELDS.items() if not isinstance(state, dict) or type(state.get(k)) is not t]
    if bad:
        raise _refuse(folder, f"a {CHECKPOINT_STATE} written by Lesion (damaged: {', '.join(bad)})")
    if integrity_hash(state) != state["integrity_sha256"]:
        raise _refuse(folder, f"a {CHECKPOINT_STATE} that matches its integrity hash (it was edited or damaged)")
    ours = checkpoint_spec(spec)
    if state["spec"] != ours:
        differ = sorted(k for k in set(state["spec"]) | set(ours) if state["spec"].get(k) != ours.get(k))
        raise _refuse(folder, "a checkpoint of this same spec (it differs in " + ", ".join(differ) + ")")
    total, size, done = len(spec.requests), batch_size(spec), state["edits"]
    rows = state["rows"]
    if not 1 <= done <= total or done != min(state["batches"] * size, total) or len(state["details"]) != \
            state["batches"] or not rows or not isinstance(rows[-1], dict) or rows[-1].get("edits") != done:
        raise _refuse(folder, f"a checkpoint after 1 to {total} edits, in whole batches of {size}, its rows "
                      f"ending there (it records {short(done)} edits in {state['batches']} batches)")
    return state


def load_checkpoint(spec, model):
    """``(done, stacked delta, previous keys, details, rows)`` from `spec.sequential.resume`, checked to
    belong to this run: the spec, the delta (its hash, spec, method, layers and base fingerprints) and
    AlphaEdit's keys (their hash and layers). Anything else is one `SpecError`; the model is not touched."""
    folder = Path(spec.sequential.resume)
    state = _read_state(folder, spec)
    try:
        stacked = load_delta(folder / CHECKPOINT)
        verify(model, stacked)
    except DeltaError as err:
        raise _refuse(folder, f"a checkpoint whose delta fits this model ({err})") from None
    layers = set(spec.edit_layers)
    if stacked.id != state["delta"] or checkpoint_spec(stacked.meta.get("spec") or {}) != state["spec"] \
            or stacked.meta.get("method") != spec.method or not all(
                any(f".{layer}." in name for layer in layers) for name in stacked.names):
        raise _refuse(folder, f"a checkpoint whose {CHECKPOINT} is this run's edit (its hash, spec, method or "
                      "layers differ)")
    keys = _read_keys(folder / CHECKPOINT_KEYS, folder)
    previous = {int(k.split(".")[1]): v for k, v in keys.items()}
    if content_hash(keys) != state["keys"] or not set(previous) <= layers:
        raise _refuse(folder, f"a checkpoint whose {CHECKPOINT_KEYS} is this run's (its hash or layers differ)")
    return state["edits"], stacked, previous, state["details"], state["rows"]


def _read_keys(path: Path, folder: Path) -> dict:
    """AlphaEdit's earlier keys: ``previous.<layer>`` tensors, finite."""
    _, keys = read_safetensors(path, "sequential.resume", f"the {CHECKPOINT_KEYS} of a checkpoint")
    if not all(k.startswith("previous.") and k.split(".", 1)[1].isdecimal() and v.is_floating_point()
               and bool(torch.isfinite(v).all()) for k, v in keys.items()):
        raise _refuse(folder, f"a {CHECKPOINT_KEYS} holding finite `previous.<layer>` tensors")
    return keys


def run_sequential(spec, model, tokenizer, out: Path, compute_edit) -> dict:
    """Edit batch by batch, measuring as configured; write curves.json, curves.png and the delta, and a
    checkpoint at every measurement (from which `sequential.resume` continues an interrupted run)."""
    probe = ScaleProbe.from_spec(spec)
    every = spec.sequential.eval_every
    total = len(spec.requests)
    rows, clock = [], {"editing": 0.0, "since": time.perf_counter(), "batches": 0}
    resume = None
    if spec.sequential.resume is not None:
        done, stacked, previous, details, rows = load_checkpoint(spec, model)
        resume = (done, stacked, previous, details)
        clock.update(editing=rows[-1]["edit_seconds"], batches=len(details))
        print(f"resuming after {done} of {total} edits from {spec.sequential.resume}", flush=True)

    def record(done: int, seconds: float, editor=None) -> None:
        start = time.perf_counter()
        stacked = editor.stacked if editor is not None else None
        row = {"edits": done, "edit_seconds": seconds,
               **probe.measure(model, tokenizer, list(spec.requests[:done]) or list(spec.requests),
                               unedited=lambda: unapplied(model, stacked) if stacked is not None else nullcontext())}
        row["measure_seconds"] = time.perf_counter() - start
        row["delta_norm"] = max(relative_norms(model, stacked).values()) if stacked is not None else 0.0
        rows.append(row)
        print(f"[{done}/{total} edits] " + ", ".join(
            f"{k} {row[k]:.3f}" for k in (*CURVE_METRICS, *GENERATION_METRICS) if row.get(k) is not None)
            + f", delta_norm {row['delta_norm']:.3f} ({seconds:.0f} s editing)",
            flush=True)
        (out / "curves.json").write_text(json.dumps({"method": spec.method, "rows": rows}, indent=1))
        save_checkpoint(out, spec, editor, done, rows)

    def on_batch(done: int, editor) -> None:
        clock["editing"] += time.perf_counter() - clock["since"]
        clock["batches"] += 1
        if clock["batches"] % every == 0 or done == total or done in spec.sequential.eval_at:
            record(done, clock["editing"], editor)
        clock["since"] = time.perf_counter()

    out.mkdir(parents=True, exist_ok=True)
    if resume is None:
        record(0, 0.0)
    clock["since"] = time.perf_counter()
    delta, details = compute_edit(spec, model, tokenizer, on_batch=on_batch, resume=resume)
    final = rows[-1]
    delta = delta.with_metrics({k: final[k] for k in (*CURVE_METRICS, *GENERATION_METRICS) if k in final})
    path = delta.save(out / "delta.safetensors")
    plot_curves({spec.method: rows}, out / "curves.png",
                title=f"{spec.method}, batches of {spec.sequential.batch_size}, {spec.model}")
    return {"delta": path.name, "bytes": path.stat().st_size, "rows": rows, "details": details,
            "metrics": delta.meta["metrics"], "edited": delta.names, "lesion_version": delta.meta.get("lesion_version"),
            "seconds": {"edit (statistics included)": final["edit_seconds"],
                        "measure": sum(r["measure_seconds"] for r in rows)}}


def plot_curves(curves: dict[str, list[dict]], path: str | Path, *, title: str = "") -> None:
    """One panel per metric against the number of edits (log-scaled x), one colour per method: teacher-forced
    metrics solid, their generation-based twins dashed (`PANELS`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(17, 7))
    for ax, (name, solid, dashed) in zip(axes.flat, PANELS):
        for i, (method, rows) in enumerate(curves.items()):
            for metric, style in ((solid, "-"), (dashed, "--")):
                points = [(max(r["edits"], 1), r[metric]) for r in rows if metric and r.get(metric) is not None]
                if points:
                    ax.plot(*zip(*points), style, color=f"C{i}", marker="o", markersize=3,
                            label=method + (" (generated)" if style == "--" else ""))
        ax.set_xscale("log")
        if "perplexity" in name:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("edits (0 drawn at 1)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
