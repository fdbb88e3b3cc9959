"""`kind: decompose`: the images, the text bank and the questions of a spec, through `decompose`, into one report.

The report names heads by what TextSpan says they write, and then checks the names by ablation: for each
attribute of the bank, the heads TextSpan names for it (`top_heads: named`: its texts of that attribute explain
at least half of the head's variance, more than any other attribute's do; or a number of heads ranked by the
variance their texts of that attribute carry) are mean-ablated together, and every question is scored again. The names come from texts
alone; the ablation is the test. `ranked_ablation` gives the same scores for the top 1, 2, … heads by rank.
"""

from __future__ import annotations

from pathlib import Path

import torch

from interventions.core.errors import SpecError
from interventions.modalities.contrastive.clip import class_embeddings, text_embeddings
from interventions.modalities.contrastive.decompose import (
    accuracy,
    contributions,
    head_ablation,
    layer_ablation,
    mean_ablated,
    text_span,
)
from interventions.modalities.contrastive.inputs import class_captions, load_image
from interventions.testbeds import scenes


def images_of(spec, size: int, processor=None) -> tuple[torch.Tensor, list]:
    """``(pixels (n, 3, size, size), scenes)``: the spec's images, and per image its scene (None for a file)."""
    pixels, shown = [], []
    for i, ref in enumerate(spec.images):
        if ref.startswith("scenes:random:"):
            n, _, seed = ref[len("scenes:random:"):].partition("@")
            g = torch.Generator().manual_seed(int(seed))
            drawn = [scenes.sample_scene(g, two=0.0) for _ in range(int(n))]
            images = scenes.render(drawn, g)
            if images.shape[-1] != size:
                images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear")
            pixels += list(images)
            shown += drawn
            continue
        pixels.append(load_image(ref, size, processor, field=f"images[{i}]"))
        shown.append(scenes.parse_scene(ref[len("scene:"):].partition("@")[0]) if ref.startswith("scene:") else None)
    return torch.stack(pixels), shown


def questions_of(spec) -> dict[str, dict[str, list[str]]]:
    return {(q.split(":", 1)[1] if isinstance(q, str) else f"question{i}"): class_captions(q)
            for i, q in enumerate(spec.questions)}


def bank_of(spec, tokenizer) -> list[tuple[str, str | None]]:
    """The text bank, each text with its attribute (None for a user's list). A text the tokenizer cannot encode
    without unknown tokens is refused."""
    bank = scenes.text_bank() if spec.texts == "scenes:bank" else [(t, None) for t in spec.texts]
    unk = getattr(tokenizer, "unk_token_id", None)
    for i, (text, _) in enumerate(bank):
        if unk is not None and unk in tokenizer(text).input_ids:
            raise SpecError(f"texts[{i}]", text, "text the model's tokenizer encodes without unknown words")
    return bank


def _truth(name: str, labels: list[str], shown: list, own: torch.Tensor) -> tuple[torch.Tensor, str]:
    if name in scenes.ATTRIBUTES and all(s is not None for s in shown):
        return torch.tensor([labels.index(scenes.truth(s, name)) for s in shown]), "truth"
    return own, "model"


@torch.no_grad()
def decompose_report(spec, clip, tokenizer, processor=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The decomposition's report (JSON-able) and its tensors."""
    size = clip.config.vision_config.image_size
    pixels, shown = images_of(spec, size, processor)
    parts = [contributions(clip, pixels[i:i + spec.batch]) for i in range(0, len(pixels), spec.batch)]
    c = type(parts[0])(*(torch.cat([getattr(p, f) for p in parts]) for f in ("heads", "mlps", "rest", "embeddings")))
    bank = bank_of(spec, tokenizer)
    texts = text_embeddings(clip, tokenizer, [t for t, _ in bank])
    report = {"images": len(pixels), "layers": c.heads.shape[1], "heads_per_layer": c.heads.shape[2],
              "decomposition_max_error": float((c.total() - c.embeddings).abs().max()),
              "embedding_max_abs": float(c.embeddings.abs().max()), "questions": {}}
    classes = {}
    for name, captions in questions_of(spec).items():
        labels, rows = class_embeddings(clip, tokenizer, captions)
        truth, against = _truth(name, labels, shown, (c.embeddings @ rows.T).argmax(-1))
        classes[name] = (rows, truth)
        report["questions"][name] = {
            "classes": labels, "scored_against": against, "chance": 1 / len(labels),
            "accuracy": accuracy(c.embeddings, rows, truth), "layer_ablation": layer_ablation(c, rows, truth),
            "head_ablation": head_ablation(c, rows, truth).tolist()}
    report["heads"] = _head_spans(spec, c, texts, bank)
    report["named_heads"], report["named_ablation"], report["ranked_ablation"] = _named(spec, c, report["heads"],
                                                                                         classes)
    tensors = {"heads": c.per_head.contiguous(), "mlps": c.mlps, "rest": c.rest, "embeddings": c.embeddings}
    return report, tensors


def _head_spans(spec, c, texts: torch.Tensor, bank) -> list[dict]:
    per_head = c.per_head
    total = float(sum(((per_head[:, l, h] - per_head[:, l, h].mean(0)) ** 2).sum()
                      for l in range(per_head.shape[1]) for h in range(per_head.shape[2])))
    out = []
    for l in range(per_head.shape[1]):
        for h in range(per_head.shape[2]):
            span = text_span(per_head[:, l, h], texts, spec.spans, spec.components)
            chosen = [{"text": bank[j][0], "attribute": bank[j][1], "share": share}
                      for j, share in zip(span.texts, span.shares)]
            attributes: dict[str, float] = {}
            for t in chosen:
                if t["attribute"] is not None:
                    attributes[t["attribute"]] = attributes.get(t["attribute"], 0.0) + t["share"]
            out.append({"layer": l, "head": h, "variance": span.variance, "share_of_heads": span.variance / total,
                        "texts": chosen, "attributes": attributes})
    return out


#: A head is named for an attribute when texts of it explain at least this share of the head's variance, more
#: than any other attribute's texts do.
NAMED_SHARE = 0.5


def names_of(head: dict) -> str | None:
    """The attribute TextSpan names `head` for, or None."""
    shares = head["attributes"]
    best = max(shares, key=shares.get, default=None)
    return best if best is not None and shares[best] >= NAMED_SHARE else None


def _named(spec, c, heads: list[dict], classes: dict) -> tuple[dict, dict, dict]:
    """Per attribute of the bank: the heads named for it (`top_heads`), every question with them ablated together,
    and every question with the top 1, 2, … heads by that attribute's variance ablated."""
    attributes = sorted({a for h in heads for a in h["attributes"]})
    named, ablation, ranked_ablation = {}, {}, {}
    for a in attributes:
        ranked = [(h["layer"], h["head"]) for h in sorted(heads, key=lambda h: -h["variance"] * h["attributes"].get(a, 0))
                  if h["attributes"].get(a, 0.0) > 0]
        chosen = ([(h["layer"], h["head"]) for h in heads if names_of(h) == a] if spec.top_heads == "named"
                  else ranked[:spec.top_heads])
        named[a] = [list(x) for x in chosen]
        ablation[a] = _scores(mean_ablated(c, chosen), classes)
        ranked_ablation[a] = [_scores(mean_ablated(c, ranked[:k]), classes) for k in range(1, len(ranked) + 1)]
    return named, ablation, ranked_ablation


def _scores(embeddings: torch.Tensor, classes: dict) -> dict[str, float]:
    return {q: accuracy(embeddings, rows, truth) for q, (rows, truth) in classes.items()}


def head_table(report: dict) -> str:
    """Markdown: one row per head, largest variance first: its top texts with their shares."""
    lines = ["| head | named for | share of head variance | top texts (share of the head's variance) | by attribute |",
             "|---|---|---|---|---|"]
    for h in sorted(report["heads"], key=lambda h: -h["variance"]):
        texts = "; ".join(f"{t['text']} ({t['share']:.2f})" for t in h["texts"])
        attrs = ", ".join(f"{a} {v:.2f}" for a, v in sorted(h["attributes"].items(), key=lambda x: -x[1]))
        lines.append(f"| L{h['layer']}.H{h['head']} | {names_of(h) or ''} | {h['share_of_heads']:.3f} | {texts} | {attrs} |")
    return "\n".join(lines) + "\n"


def save_figure(report: dict, path: Path) -> None:
    """Layer ablation per question; the heads by the attribute TextSpan names them for; the named heads' ablation
    against each question (accuracy kept, as a share of the unablated accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.2, 0.8, 1.1]})
    for name, q in report["questions"].items():
        left.plot(range(len(q["layer_ablation"])), q["layer_ablation"], marker="o", label=name)
    left.set_xlabel("direct effects of layers 0..L-1 mean-ablated (L)")
    left.set_ylabel("zero-shot accuracy")
    left.set_title("Mean-ablating early layers")
    left.legend(fontsize=8)
    attributes = list(report["named_ablation"])
    layers, per_layer = report["layers"], report["heads_per_layer"]
    codes = torch.full((layers, per_layer), float("nan"))
    for h in report["heads"]:
        name = names_of(h)
        if name is not None:
            codes[h["layer"], h["head"]] = attributes.index(name)
        middle.text(h["head"], h["layer"], name or "-", ha="center", va="center", fontsize=7)
    middle.imshow(codes, cmap="Pastel1", vmin=0, vmax=8, origin="lower")
    middle.set_xticks(range(per_layer))
    middle.set_yticks(range(layers))
    middle.set_xlabel("head")
    middle.set_ylabel("layer")
    middle.set_title("What TextSpan names each head for")
    questions = list(report["questions"])
    matrix = torch.tensor([[report["named_ablation"][a][q] / max(report["questions"][q]["accuracy"], 1e-9)
                            for q in questions] for a in attributes])
    im = right.imshow(matrix, vmin=0, vmax=1.1, cmap="viridis")
    right.set_xticks(range(len(questions)), questions, rotation=30)
    right.set_yticks(range(len(attributes)), [f"{a} heads ({len(report['named_heads'][a])})" for a in attributes])
    for i in range(len(attributes)):
        for j in range(len(questions)):
            right.text(j, i, f"{float(matrix[i, j]):.2f}", ha="center", va="center", color="w", fontsize=8)
    right.set_title("Accuracy kept with the named heads ablated")
    fig.colorbar(im, ax=right, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
