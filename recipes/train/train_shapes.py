"""Train the coloured-shapes text-to-image testbed and ship it in checkpoints/ with its evaluation.

    python -m recipes.train.train_shapes --steps 2400      # what shipped: 1,289 s on 2 CPU threads
    python -m recipes.train.train_shapes --steps 20 --out /tmp/t.safetensors --no-register   # a smoke run

Real diffusers/transformers classes (`UNet2DConditionModel` with cross-attention, `CLIPTextModel`,
a word-level tokenizer, DDPM cosine noise for training and DDIM for sampling) learn captions
such as "a red circle" from `interventions.testbeds.shapes` images, in pixel space (16x16, no VAE).
Epsilon MSE, AdamW with warm-up and cosine decay, EMA of the weights; 10% of captions drop the
colour word and 10% are empty (for classifier-free guidance).

The evaluation generates `--eval-images` images per colour x shape at held-out seeds (from
1,000,000 on; training never samples) and names their colour and shape with the evaluator,
whose own accuracy on rendered images is reported next to it.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from interventions.modalities.text_to_image.pipeline import (
    CHECKPOINTS,
    TESTBED_FILE,
    DiffusionPipe,
    build_testbed,
    save_testbed,
)
from interventions.testbeds.shapes import COLOURS, SHAPES, Evaluator, caption, render, train_shape_net

log = logging.getLogger("lesion.train_shapes")
EVAL_SEED = 1_000_000


def train_denoiser(unet, trained: torch.nn.Module, draw, steps: int, batch: int, lr: float, seed: int,
                   ema_decay: float) -> tuple[torch.nn.Module, list[float]]:
    """The testbeds' training loop: epsilon MSE under DDPM cosine noise, AdamW with warm-up and cosine
    decay, gradient clipping, an EMA of `trained` (the modules that learn, `unet` among them).
    `draw(g)` gives a batch's clean inputs x0 and UNet context (built with gradients where a text encoder
    learns). Returns the EMA copy of `trained` and the per-step losses."""
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    trained.train()
    ema = copy.deepcopy(trained).eval().requires_grad_(False)
    opt = torch.optim.AdamW(trained.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    g = torch.Generator().manual_seed(seed)
    device = next(unet.parameters()).device      # the draws stay on the CPU generator, wherever it trains
    losses = []
    for step in range(steps):
        x0, context = draw(g)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        x0, context, noise, t = (v.to(device) for v in (x0, context, noise, t))
        xt = noise_sched.add_noise(x0, noise, t)
        loss = torch.nn.functional.mse_loss(unet(xt, t, encoder_hidden_states=context).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), trained.parameters()):
                pe.lerp_(p, 1 - decay)
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.4f (mean of last 100: %.4f)", step, steps, losses[-1],
                     sum(losses[-100:]) / len(losses[-100:]))
    return ema, losses


def train(steps: int, batch: int, lr: float, seed: int, ema_decay: float) -> tuple[DiffusionPipe, list[float]]:
    pipe = build_testbed(["a", *COLOURS, *SHAPES], seed=seed)
    modules = torch.nn.ModuleDict({"unet": pipe.unet, "text_encoder": pipe.text_encoder})

    def draw(g):
        images, colours, shapes = render(g, batch)
        drop = torch.rand(batch, generator=g)
        captions = [caption(None if d < 0.2 else int(c), None if d < 0.1 else int(s))
                    for c, s, d in zip(colours, shapes, drop.tolist())]
        return images * 2 - 1, pipe.text_encoder(input_ids=pipe.tokenize(captions)).last_hidden_state

    ema, losses = train_denoiser(pipe.unet, modules, draw, steps, batch, lr, seed, ema_decay)
    pipe.unet, pipe.text_encoder = ema["unet"], ema["text_encoder"]
    return pipe, losses


def evaluate(pipe: DiffusionPipe, evaluator: Evaluator, per_cell: int, seed: int = EVAL_SEED) -> dict:
    """Colour, shape and joint accuracy per (colour, shape) cell at held-out seeds."""
    prompts, want_c, want_s = [], [], []
    for ci in range(len(COLOURS)):
        for si in range(len(SHAPES)):
            prompts += [caption(ci, si)] * per_cell
            want_c += [ci] * per_cell
            want_s += [si] * per_cell
    seeds = [seed + i for i in range(len(prompts))]
    images = pipe.generate(prompts, seeds)
    colours, shapes = evaluator(images)
    want_c, want_s = torch.tensor(want_c), torch.tensor(want_s)
    table = {}
    for ci, cname in enumerate(COLOURS):
        for si, sname in enumerate(SHAPES):
            m = (want_c == ci) & (want_s == si)
            table[f"{cname} {sname}"] = {"colour": float((colours[m] == ci).float().mean()),
                                         "shape": float((shapes[m] == si).float().mean())}
    return {"per_cell": table, "images_per_cell": per_cell, "seeds_from": seed,
            "colour": float((colours == want_c).float().mean()), "shape": float((shapes == want_s).float().mean()),
            "both": float(((colours == want_c) & (shapes == want_s)).float().mean())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-images", type=int, default=32, help="Images per colour x shape in the evaluation.")
    ap.add_argument("--out", type=Path, default=None, help=f"Default: checkpoints/{TESTBED_FILE}.")
    ap.add_argument("--no-register", action="store_true", help="Do not list the result in checkpoints/manifest.json.")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "no_register")}

    t0 = time.perf_counter()
    pipe, losses = train(args.steps, args.batch, args.lr, args.seed, args.ema)
    train_s = time.perf_counter() - t0
    shape_net, evaluator_accuracy = train_shape_net(seed=args.seed)
    evaluator = Evaluator(shape_net)
    t1 = time.perf_counter()
    evaluation = evaluate(pipe, evaluator, args.eval_images)
    evaluation["evaluator_shape_accuracy_on_renders"] = evaluator_accuracy
    eval_s = time.perf_counter() - t1
    meta = {"recipe": "recipes/train/train_shapes.py", "settings": settings, "train_seconds": round(train_s, 1),
            "threads": args.threads, "final_loss_mean_100": sum(losses[-100:]) / len(losses[-100:]),
            "evaluation": evaluation}
    out = args.out or CHECKPOINTS / TESTBED_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    save_testbed(pipe, out, shape_net, meta)
    print(json.dumps({k: v for k, v in meta.items() if k != "evaluation"}, indent=1))
    print(json.dumps({k: v for k, v in evaluation.items() if k != "per_cell"}, indent=1))
    for cell, row in evaluation["per_cell"].items():
        print(f"{cell:18s} colour {row['colour']:.2f} shape {row['shape']:.2f}")
    print(f"trained in {train_s:.0f} s, evaluated in {eval_s:.0f} s; wrote {out}")
    if not args.no_register and args.out is None:
        from recipes.train.manifest import register_in_place

        register_in_place(out, kind="testbed", recipe="recipes/train/train_shapes.py",
                          command=" ".join(["python -m recipes.train.train_shapes", *(sys.argv[1:] if argv is None else argv)]),
                          model="shapes-diffusion", train_seconds=round(train_s, 1), settings=settings,
                          evaluation={k: v for k, v in evaluation.items() if k != "per_cell"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
