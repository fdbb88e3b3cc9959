"""Train the contrastive testbed (`scenes-clip`): a small CLIP on the scenes world's renders and captions.

    python -m recipes.train.train_scenes_clip                  # what shipped (see checkpoints/manifest.json)
    python -m recipes.train.train_scenes_clip --steps 20 --eval 50 --out /tmp/c.safetensors --no-register

Each step renders `--batch` new scenes (half of them pairs), jitters and augments them, and writes one
caption per scene in the *training* phrasing. The loss is CLIP's symmetric cross-entropy with every
consistent pair a positive (`scenes.consistent`: a caption that leaves out size or position also
describes the scenes that differ only there), so that the many true duplicates of a batch are not
pushed apart. AdamW, warm-up and cosine decay.

The evaluation asks zero-shot questions of new scenes (seeds training never drew): colour, shape, size
and position of single objects and the count of objects, each against the prompt-ensembled class
embeddings of `scenes.class_prompts`; the figures go into the checkpoint's header and the manifest.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import torch

from interventions.core.paths import CHECKPOINTS
from interventions.modalities.contrastive.clip import image_embeddings
from interventions.modalities.contrastive.scenes_clip import (
    FILE,
    PROJECTION,
    TEXT,
    VISION,
    build,
    save,
    zero_shot_accuracy,
)
from interventions.testbeds.scenes import Phrasing, augment, consistent, render, sample_scene

log = logging.getLogger("lesion.train_scenes_clip")
EVAL_SEED = 1_000_000


def batch(n: int, g: torch.Generator, rnd: random.Random):
    scenes = [sample_scene(g, two=0.5) for _ in range(n)]
    captions = [Phrasing().caption(s, rnd) for s in scenes]
    positives = torch.tensor([[consistent(c, d, s) for s in scenes] for c, d in zip(captions, scenes)]).float()
    return augment(render(scenes, g), g), captions, positives        # positives[caption, image]


def loss_of(model, tokenizer, images, captions, positives) -> torch.Tensor:
    text = tokenizer(captions, padding=True, return_tensors="pt")
    t = torch.nn.functional.normalize(model.get_text_features(**text).pooler_output, dim=-1)
    v = image_embeddings(model, images)
    logits = model.logit_scale.exp() * t @ v.T                           # (captions, images)
    by_text = -(positives / positives.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    by_image = -(positives.T / positives.sum(0)[:, None] * logits.T.log_softmax(1)).sum(1).mean()
    return (by_text + by_image) / 2


def train(model, tokenizer, steps: int, size: int, lr: float, seed: int) -> list[float]:
    g, rnd = torch.Generator().manual_seed(seed), random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    losses = []
    model.train()
    for step in range(steps):
        loss = loss_of(model, tokenizer, *batch(size, g, rnd))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.4f", step, steps, sum(losses[-100:]) / len(losses[-100:]))
    model.eval()
    return losses


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", type=int, default=500, help="new scenes per zero-shot question")
    ap.add_argument("--out", type=Path, default=CHECKPOINTS / FILE)
    ap.add_argument("--no-register", action="store_true", help="do not list the file in checkpoints/manifest.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, tokenizer = build(args.seed)
    started = time.time()
    losses = train(model, tokenizer, args.steps, args.batch, args.lr, args.seed)
    seconds = time.time() - started
    accuracy = zero_shot_accuracy(model, tokenizer, args.eval, EVAL_SEED)
    log.info("zero-shot accuracy on new scenes: %s", json.dumps(accuracy))
    meta = {"vision": VISION, "text": TEXT, "projection_dim": PROJECTION, "steps": args.steps, "batch": args.batch,
            "lr": args.lr, "seed": args.seed, "train_seconds": round(seconds), "final_loss": sum(losses[-100:]) / 100,
            "threads": torch.get_num_threads(), "zero_shot": accuracy, "eval_scenes": args.eval,
            "eval_seed": EVAL_SEED}
    save(model, tokenizer, args.out, meta)
    if not args.no_register:
        from recipes.train.manifest import register_in_place

        register_in_place(args.out, kind="testbed", command="python -m recipes.train.train_scenes_clip "
                          + " ".join(argv if argv is not None else sys.argv[1:]), zero_shot=accuracy,
                          train_seconds=round(seconds))
    print(json.dumps({"zero_shot": accuracy, "train_seconds": round(seconds)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
