"""The contrastive testbed (``scenes-clip``): a small transformers `CLIPModel` trained here on the scenes world.

Its image tower is a ViT (24×24 pixels in 6×6 patches of 4, plus CLS; 6 layers, d 64, 4 heads); its text
tower a 3-layer CLIP text transformer over a word-level vocabulary of the scenes captions (every word of
the training and held-out phrasings; `tokenizer`). `recipes/train/train_scenes_clip.py` trains both with a
multi-positive contrastive loss (a caption counts as a positive for every image it also describes,
`scenes.consistent`) and ships the weights in ``checkpoints/scenes_clip.safetensors``, with the
configuration, vocabulary and zero-shot accuracy in the file's header.

>>> model, tokenizer = build(seed=0)
>>> model.vision_model.embeddings.num_patches, len(model.vision_model.encoder.layers)
(36, 6)
>>> tokenizer("a red circle").input_ids[0] == tokenizer.bos_token_id
True
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch

from interventions.core.errors import ModelNotAvailable
from interventions.core.paths import CHECKPOINTS
from interventions.models.families import SCENES_CLIP
from interventions.testbeds import scenes

FILE = "scenes_clip.safetensors"
SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
VISION = {"image_size": scenes.SIZE, "patch_size": 4, "hidden_size": 64, "intermediate_size": 256,
          "num_hidden_layers": 6, "num_attention_heads": 4}
TEXT = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
        "max_position_embeddings": 40}
PROJECTION = 64
_WORD = re.compile(r"\w+|[^\w\s]+")


def vocabulary() -> list[str]:
    """Every word of the scenes captions, training and held-out phrasings, and of the zero-shot prompts."""
    rnd, g = random.Random(0), torch.Generator().manual_seed(0)
    texts = []
    for heldout in (False, True):
        phrasing = scenes.Phrasing(heldout=heldout)
        texts += [phrasing.caption(scenes.sample_scene(g, two=0.5), rnd) for _ in range(4000)]
    for table in (scenes.COLOUR_WORDS, scenes.COLOUR_THINGS, scenes.SHAPE_WORDS, scenes.SIZE_WORDS,
                  scenes.POSITION_WORDS):
        texts += [w for words in table.values() for w in words.train + words.heldout]
    for forms in (scenes.OBJECT_FORMS, scenes.SCENE_FORMS, scenes.PAIR_FORMS):
        texts += list(forms.train + forms.heldout)
    texts += [p for a in scenes.ATTRIBUTES for ps in scenes.class_prompts(a).values() for p in ps]
    words = sorted({w for t in texts for w in _WORD.findall(t.lower()) if "{" not in w and "}" not in w})
    return list(SPECIALS) + words


def tokenizer(vocab: list[str] | None = None):
    """A word-level fast tokenizer (lower-cased; ``[BOS] words [EOS]``) over `vocab` (default `vocabulary()`)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocab or vocabulary()
    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordLevel(ids, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]",
                                                       special_tokens=[("[BOS]", ids["[BOS]"]), ("[EOS]", ids["[EOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                   unk_token="[UNK]")


def config(vocab_size: int):
    from transformers import CLIPConfig

    text = dict(TEXT, vocab_size=vocab_size, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return CLIPConfig(text_config=text, vision_config=dict(VISION), projection_dim=PROJECTION)


def build(seed: int = 0, vocab: list[str] | None = None):
    """``(CLIPModel, tokenizer)`` freshly initialised with `seed`."""
    from transformers import CLIPModel

    tok = tokenizer(vocab)
    torch.manual_seed(seed)
    return CLIPModel(config(len(tok))).eval(), tok


def save(model, tok, path: Path, meta: dict) -> None:
    from interventions.core.atomic import atomic_save_file

    header = {"vocab": sorted(tok.get_vocab(), key=tok.get_vocab().get), **meta}
    atomic_save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path,
                     metadata={"lesion_testbed": json.dumps(header)})


def load(path: str | Path | None = None, *, device: str | torch.device = "cpu"):
    """``(CLIPModel, tokenizer, meta)`` of the shipped testbed (or the file at `path`)."""
    from safetensors import safe_open

    path = Path(path) if path is not None else CHECKPOINTS / FILE
    if not path.is_file():
        raise ModelNotAvailable(f"`model`: {SCENES_CLIP!r} needs {path}; train it with: "
                                "python -m recipes.train.train_scenes_clip")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lesion_testbed"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model, tok = build(vocab=meta["vocab"])
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.to(device).eval(), tok, meta


@torch.no_grad()
def zero_shot_accuracy(model, tok, n: int, seed: int) -> dict[str, float]:
    """Zero-shot accuracy on `n` new scenes per attribute (single objects; half pairs for `count`), each
    against the prompt-ensembled classes of `scenes.class_prompts`."""
    from interventions.modalities.contrastive.clip import class_embeddings, image_embeddings

    out = {}
    for attribute in scenes.ATTRIBUTES:
        g = torch.Generator().manual_seed(seed + len(out))
        two = 0.5 if attribute == "count" else 0.0
        shown = [scenes.sample_scene(g, two=two) for _ in range(n)]
        labels, classes = class_embeddings(model, tok, scenes.class_prompts(attribute))
        guess = (image_embeddings(model, scenes.render(shown, g)) @ classes.T).argmax(-1)
        out[attribute] = float((guess == torch.tensor([labels.index(scenes.truth(s, attribute)) for s in shown]))
                               .float().mean())
    return out
