"""Train the VLM testbed: a CLIP vision tower + projector that shows SmolLM2-135M (frozen) which country
a synthetic flag belongs to, inside transformers' `LlavaForConditionalGeneration`.

    python -m recipes.train.train_flags                   # what shipped: 292 s on 2 CPU threads
    python -m recipes.train.train_flags --tower deep      # the deep-tower testbed (6 layers, 16 patches)
    python -m recipes.train.train_flags --steps 50 --out /tmp/f.safetensors --no-register   # a smoke run

Training only ever asks for the country's *name*. Stage 1 regresses the image tokens onto the
country word's input embedding ((1 - cos) + relative MSE; no LM forward); stage 2 adds the
naming loss through the frozen LM for a few naming templates (plain naming loss alone converged
too slowly on this CPU: 15% after 20 minutes). The evaluation then asks questions training never
asked ("The capital of this country is"), whose answers must come from the LM's own knowledge,
next to the LM's accuracy when the country is named in text.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from interventions.core.atomic import atomic_save_file
from interventions.core.paths import CHECKPOINTS
from interventions.modalities.vision_language.llava import VisionSpec, assemble_llava, image_prompt
from interventions.models.loading import load_model
from interventions.testbeds.flags import COUNTRIES, render

log = logging.getLogger("lesion.train_flags")
CHECKPOINT = CHECKPOINTS / "vlm_flags_smollm2.safetensors"
#: The towers a run can train: the first testbed's (2 layers, 4 patches) and one worth looking into (6 layers, 16
#: patches, `llava-flags-deep-smollm2`), each with the file it ships as.
TOWERS = {"small": (VisionSpec(), CHECKPOINT),
          "deep": (VisionSpec(image_size=32, patch_size=8, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                              num_attention_heads=4), CHECKPOINTS / "vlm_flags_deep_smollm2.safetensors")}
NAMING = " This is the flag of"
#: Stage 2 trains naming with these (the evaluation's naming prompt is among them; its capital
#: questions are not).
NAMING_TEMPLATES = (" This is the flag of", " The flag shown is the flag of", " This flag belongs to")
KNOWLEDGE = (" The capital of this country is", " This is the flag of a country whose capital is",
             " Its capital city is")
EVAL_SEED = 1_000_000


def image_features(vlm, pixels: torch.Tensor) -> torch.Tensor:
    """What the LM receives at the image positions: the projected last-layer patch features."""
    tower = vlm.model.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]
    p = vlm.model.multi_modal_projector
    return p.linear_2(p.act(p.linear_1(tower)))


def train(vlm, tokenizer, steps: int, batch: int, lr: float, seed: int, naming_steps: int = 0) -> list[float]:
    ids = torch.tensor([tokenizer(" " + c, add_special_tokens=False).input_ids[0] for c, _ in COUNTRIES])
    targets = vlm.get_input_embeddings().weight[ids].detach()
    params = list(vlm.model.vision_tower.parameters()) + list(vlm.model.multi_modal_projector.parameters())
    for p in vlm.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    losses = []
    vlm.model.vision_tower.train()
    for step in range(steps):
        which = torch.randint(len(COUNTRIES), (batch,), generator=g)
        feats = image_features(vlm, render(which.tolist(), g))             # (batch, tokens, d)
        want = targets[which][:, None].expand_as(feats)
        cos = torch.nn.functional.cosine_similarity(feats, want, dim=-1)
        rel = ((feats - want) ** 2).sum(-1) / (want ** 2).sum(-1)
        loss = (1 - cos).mean() + rel.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
        if step % 100 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.4f", step, steps, sum(losses[-100:]) / len(losses[-100:]))
    if naming_steps:
        losses += train_naming(vlm, tokenizer, targets, ids, params, naming_steps, g)
    vlm.eval()
    for p in params:
        p.requires_grad_(False)
    return losses


def train_naming(vlm, tokenizer, targets, ids, params, steps: int, g, batch: int = 16, lr: float = 3e-4):
    """Stage 2: the naming loss through the frozen LM (cross-entropy of the country token after a
    naming template), with the embedding loss kept, so that the LM reads the image tokens as it
    reads the country's name."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    prompts = [image_prompt(tokenizer, vlm, t) for t in NAMING_TEMPLATES]
    losses = []
    for step in range(steps):
        which = torch.randint(len(COUNTRIES), (batch,), generator=g)
        template = torch.randint(len(prompts), (1,), generator=g).item()
        pixels = render(which.tolist(), g)
        out = vlm(input_ids=torch.tensor([prompts[template]] * batch), pixel_values=pixels)
        naming = torch.nn.functional.cross_entropy(out.logits[:, -1], ids[which])
        feats = image_features(vlm, pixels)
        want = targets[which][:, None].expand_as(feats)
        embed = (1 - torch.nn.functional.cosine_similarity(feats, want, dim=-1)).mean()
        loss = naming + embed
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
        if step % 25 == 0 or step == steps - 1:
            log.info("naming step %d/%d loss %.4f (naming %.4f)", step, steps, loss.item(), naming.item())
    return losses


@torch.no_grad()
def top1(vlm, tokenizer, prompts: list[list[int]], pixels: torch.Tensor | None, answers: list[str]) -> list[bool]:
    """Whether each prompt's next-token argmax is the answer's first token (left-padded batch)."""
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = {"pixel_values": pixels} if pixels is not None else {}
    logits = vlm(input_ids=ids, attention_mask=mask, **kwargs).logits[:, -1]
    want = [tokenizer(" " + a, add_special_tokens=False).input_ids[0] for a in answers]
    return [int(l.argmax()) == w for l, w in zip(logits, want)]


def evaluate(vlm, tokenizer, per_country: int = 4, seed: int = EVAL_SEED) -> dict:
    g = torch.Generator().manual_seed(seed)
    which = [i for i in range(len(COUNTRIES)) for _ in range(per_country)]
    pixels = render(which, g)
    names = [COUNTRIES[i][0] for i in which]
    capitals = [COUNTRIES[i][1] for i in which]
    naming = top1(vlm, tokenizer, [image_prompt(tokenizer, vlm, NAMING)] * len(which), pixels, names)
    out = {"images_per_country": per_country, "seeds_from": seed, "naming": sum(naming) / len(naming)}
    for q in KNOWLEDGE:
        hits = top1(vlm, tokenizer, [image_prompt(tokenizer, vlm, q)] * len(which), pixels, capitals)
        out[f"image:{q.strip()}"] = sum(hits) / len(hits)
    bos = tokenizer.bos_token or tokenizer.eos_token
    text = [tokenizer(f"{bos}The capital of {c} is", add_special_tokens=False).input_ids for c, _ in COUNTRIES]
    hits = top1(vlm, tokenizer, text, None, [cap for _, cap in COUNTRIES])
    out["text: The capital of <country> is"] = sum(hits) / len(hits)
    # The same prompts with the country's name written where the image goes: the ceiling of this design
    for q, answers in ((NAMING, [c for c, _ in COUNTRIES]), *((q, [cap for _, cap in COUNTRIES]) for q in KNOWLEDGE)):
        named = [image_prompt(tokenizer, vlm, q, prefix=f"{bos} {c}") for c, _ in COUNTRIES]
        named = [[t for t in ids if t != vlm.config.image_token_id] for ids in named]
        hits = top1(vlm, tokenizer, named, None, answers)
        out[f"text in place of the image:{q.strip()}"] = sum(hits) / len(hits)
    no_prefix = [image_prompt(tokenizer, vlm, NAMING, prefix="")] * len(which)
    hits = top1(vlm, tokenizer, no_prefix, pixels, names)
    out["naming without the prefix token (control)"] = sum(hits) / len(hits)
    per = {}
    for i, (c, _) in enumerate(COUNTRIES):
        rows = [k for k, w in enumerate(which) if w == i]
        per[c] = sum(naming[k] for k in rows) / len(rows)
    out["naming_per_country"] = per
    return out


def save(vlm, path: Path, meta: dict) -> None:
    tensors = {f"vision_tower.{k}": v.contiguous() for k, v in vlm.model.vision_tower.state_dict().items()}
    tensors.update({f"multi_modal_projector.{k}": v.contiguous()
                    for k, v in vlm.model.multi_modal_projector.state_dict().items()})
    atomic_save_file(tensors, path, metadata={"lesion_testbed": json.dumps(meta)})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--naming-steps", type=int, default=150, help="Stage 2 steps (naming loss through the LM).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tower", choices=sorted(TOWERS), default="small", help="small: 2 layers, 4 patches (the first "
                    "testbed); deep: 6 layers, 16 patches")
    ap.add_argument("--out", type=Path, default=None, help=f"Default: {CHECKPOINT}")
    ap.add_argument("--no-register", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    lm, tokenizer = load_model("smollm2-135m")
    vision, checkpoint = TOWERS[args.tower]
    vlm, tokenizer = assemble_llava(lm, tokenizer, vision, seed=args.seed)
    del lm
    start = time.perf_counter()
    losses = train(vlm, tokenizer, args.steps, args.batch, args.lr, args.seed, args.naming_steps)
    seconds = time.perf_counter() - start
    evaluation = evaluate(vlm, tokenizer)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "no_register")}
    meta = {"recipe": "recipes/train/train_flags.py", "language_model": "smollm2-135m", "vision": vision.__dict__,
            "countries": [list(c) for c in COUNTRIES], "settings": settings, "train_seconds": round(seconds, 1),
            "final_loss_mean_100": sum(losses[-100:]) / len(losses[-100:]), "evaluation": evaluation}
    out = args.out or checkpoint
    save(vlm, out, meta)
    print(json.dumps({k: v for k, v in evaluation.items() if k != "naming_per_country"}, indent=1))
    print(f"trained in {seconds:.0f} s; wrote {out}")
    if not args.no_register and args.out is None:
        from recipes.train.manifest import register_in_place

        register_in_place(out, kind="testbed", recipe="recipes/train/train_flags.py",
                          command=" ".join(["python -m recipes.train.train_flags", *(sys.argv[1:] if argv is None else argv)]),
                          model="llava(smollm2-135m) vision tower + projector", train_seconds=round(seconds, 1),
                          settings=settings, evaluation={k: v for k, v in evaluation.items()
                                                         if k != "naming_per_country"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
