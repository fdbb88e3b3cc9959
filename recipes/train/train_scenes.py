"""Train the scenes text-to-image testbed (`scenes-smollm2`) and ship its UNet in checkpoints/.

    python -m recipes.train.train_scenes                      # what shipped (see checkpoints/manifest.json)
    python -m recipes.train.train_scenes --steps 20 --bank 64 --eval-images 2 --out /tmp/s.safetensors --no-register

A diffusers `UNet2DConditionModel` learns `interventions.testbeds.scenes` images from captions encoded by the
frozen SmolLM2-135M (its layer-`--layers` residual stream, through the `TextAdapter` that trains with
the UNet, read by cross-attention). The language model never changes, so every caption of a fixed
bank (`--bank` scenes, each with one caption in the *training* phrasing, 10% without colour words,
10% empty) is encoded once and the adapter's standardisation is measured on it; each step renders
its scenes afresh (new jitter) and trains on epsilon MSE (DDPM cosine noise, AdamW, warm-up and
cosine decay, EMA of UNet and adapter). 4,000 steps took 2,775 s on 2 CPU threads.

The evaluation generates images at held-out seeds for new scenes, captioned in the training
phrasing and in the held-out one (words, things and forms never seen in training), and reads
them back with the evaluator, whose own accuracy on rendered scenes is reported next to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch

from interventions.modalities.text_to_image.pipeline import (
    CHECKPOINTS,
    SCENES,
    SCENES_FILE,
    SCENES_LAYERS,
    DiffusionPipe,
    build_scenes_testbed,
    save_scenes_testbed,
    scenes_text_encoder,
)
from interventions.testbeds.scenes import (
    Evaluator,
    Phrasing,
    evaluator_accuracy,
    positioned,
    render,
    sample_scene,
    train_shape_net,
)

log = logging.getLogger("lesion.train_scenes")
EVAL_SEED = 1_000_000


def caption_bank(n: int, seed: int) -> tuple[list, list[str]]:
    """`n` scenes with one training-phrasing caption each (10% colourless, 10% empty)."""
    g, rnd = torch.Generator().manual_seed(seed), random.Random(seed)
    scenes, captions = [], []
    for _ in range(n):
        scene = sample_scene(g)
        u = rnd.random()
        captions.append("" if u < 0.1 else Phrasing().caption(scene, rnd, colour=u >= 0.2))
        scenes.append(scene)
    return scenes, captions


@torch.no_grad()
def encode_all(pipe: DiffusionPipe, captions: list[str], batch: int = 64) -> torch.Tensor:
    """The frozen language model's states of every caption at the layer the adapter reads (before the
    adapter, which trains), cached on disk by the captions' ids and the layers: the language model never
    changes, so a later run with the same bank reads them back."""
    import hashlib

    from safetensors.torch import load_file

    from interventions.core.atomic import atomic_save_file
    from interventions.models.loading import lesion_home

    ids = pipe.tokenize(captions)
    if (ids[:, -1] != pipe.tokenizer.pad_token_id).any():
        raise ValueError(f"a caption fills all {ids.shape[1]} tokens; raise the testbed's max_length")
    digest = hashlib.sha256(f"{pipe.meta['lm']}/{pipe.meta['text_layers']}".encode() + ids.cpu().numpy().tobytes())
    path = lesion_home() / "scenes_bank" / f"{digest.hexdigest()[:24]}.safetensors"
    if path.is_file():
        return load_file(str(path))["states"]
    from editors.methods.rome import hooked

    read = []      # what the adapter is given: the language model's states
    with hooked(pipe.text_encoder.norm, lambda module, args: read.append(args[0]), pre=True):
        for i in range(0, len(ids), batch):
            pipe.encode_ids(ids[i:i + batch])
    states = torch.cat(read)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_file({"states": states.contiguous()}, path)
    return states


@torch.no_grad()
def set_standardisation(adapter: torch.nn.Module, states: torch.Tensor) -> None:
    """The adapter's fixed standardisation: per-feature mean and spread of the bank's states at every
    position (pads too, as the UNet reads them all)."""
    flat = states.reshape(-1, states.shape[-1])
    adapter.mean.copy_(flat.mean(0))
    adapter.std.copy_(flat.std(0))


def train(pipe: DiffusionPipe, scenes, states: torch.Tensor, steps: int, batch: int, lr: float, seed: int,
          ema_decay: float) -> list[float]:
    """Train `pipe.unet` and the text adapter together in place (their EMA weights at the end), on the
    bank's language-model `states`; the per-step losses."""
    from recipes.train.train_shapes import train_denoiser

    adapter = pipe.text_encoder.norm
    trained = torch.nn.ModuleDict({"unet": pipe.unet, "adapter": adapter.requires_grad_(True)})

    def draw(g):
        rows = torch.randint(len(scenes), (batch,), generator=g)
        return render([scenes[int(r)] for r in rows], g) * 2 - 1, adapter(states[rows])

    ema, losses = train_denoiser(pipe.unet, trained, draw, steps, batch, lr, seed, ema_decay)
    pipe.unet, pipe.text_encoder.norm = ema["unet"], ema["adapter"].requires_grad_(False)
    return losses


def evaluate(pipe: DiffusionPipe, evaluator: Evaluator, n: int, seed: int = EVAL_SEED) -> dict:
    """Attribute accuracy of images for `n` new scenes, captioned in the training and held-out phrasings,
    and the evaluator's own accuracy on rendered scenes."""
    g = torch.Generator().manual_seed(seed)
    scenes = [sample_scene(g) for _ in range(n)]
    out = {"scenes": n, "seeds_from": seed}
    for name, phrasing in (("train_phrasing", Phrasing()), ("heldout_phrasing", Phrasing(heldout=True))):
        rnd = random.Random(seed)
        captions = [phrasing.caption(s, rnd) for s in scenes]
        images = pipe.generate(captions, [seed + i for i in range(n)])
        out[name] = evaluator.matches(images, scenes, check_position=[positioned(c, s) for c, s in zip(captions, scenes)])
        out[name + "_examples"] = captions[:5]
    out["evaluator_on_renders"] = evaluator_accuracy(evaluator)
    return out


def reevaluate(path: Path, n: int, register: bool) -> int:
    """Evaluate a testbed file again under the current sampler (`testbed_scheduler`, `SCENES_GUIDANCE`),
    keeping the training's record and adding the earlier evaluation under `evaluation_before`."""
    from interventions.modalities.text_to_image.pipeline import SCENES_GUIDANCE, load_scenes_testbed

    pipe = load_scenes_testbed(path)
    header = {k: v for k, v in pipe.meta.items() if k != "evaluator"}
    pipe.guidance = SCENES_GUIDANCE
    evaluator = pipe.meta["evaluator"]
    evaluation = evaluate(pipe, evaluator, n)
    keep = ("recipe", "settings", "train_seconds", "encode_seconds", "threads", "final_loss_mean_100")
    meta = {**{k: header[k] for k in keep if k in header}, "evaluation": evaluation,
            "evaluation_before": header.get("evaluation_before", header.get("evaluation"))}
    save_scenes_testbed(pipe, path, evaluator.shape_net, meta)
    print(json.dumps(evaluation, indent=1))
    if register:
        from recipes.train.manifest import register_in_place

        rows = json.loads((path.parent / "manifest.json").read_text())["artefacts"]
        old = next(a for a in rows if a["path"] == path.name)
        drop = ("path", "sha256", "bytes", "created", "evaluation", "evaluation_before", "reevaluated")
        register_in_place(path, **{k: v for k, v in old.items() if k not in drop},
                          evaluation=evaluation, evaluation_before=meta["evaluation_before"],
                          reevaluated="python -m recipes.train.train_scenes --reevaluate")
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--bank", type=int, default=4000, help="Scenes (and captions) encoded once.")
    ap.add_argument("--layers", type=int, default=SCENES_LAYERS, help="SmolLM2 layers read (of 30).")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-images", type=int, default=200, help="New scenes in the evaluation (per phrasing).")
    ap.add_argument("--init", type=Path, default=None, help="Start from this testbed file's UNet (continue training).")
    ap.add_argument("--out", type=Path, default=None, help=f"Default: checkpoints/{SCENES_FILE}.")
    ap.add_argument("--no-register", action="store_true", help="Do not list the result in checkpoints/manifest.json.")
    ap.add_argument("--reevaluate", action="store_true",
                    help="Train nothing: evaluate the file at --out (default: the shipped one) again with the current "
                         "sampler settings and rewrite its header and manifest entry; its weights stay bit for bit.")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("out", "no_register")}

    if args.reevaluate:
        return reevaluate(args.out or CHECKPOINTS / SCENES_FILE, args.eval_images, register=not args.no_register)
    t0 = time.perf_counter()
    if args.init is not None:       # its UNet, layers and standardisation
        from interventions.modalities.text_to_image.pipeline import load_scenes_testbed

        pipe = load_scenes_testbed(args.init)
        pipe.unet.train()
    else:
        pipe = build_scenes_testbed(seed=args.seed, text=scenes_text_encoder(layers=args.layers))
    scenes, captions = caption_bank(args.bank, args.seed)
    states = encode_all(pipe, captions)
    if args.init is None:
        set_standardisation(pipe.text_encoder.norm, states)
    encode_s = time.perf_counter() - t0
    log.info("encoded %d captions in %.0f s", len(captions), encode_s)
    losses = train(pipe, scenes, states, args.steps, args.batch, args.lr, args.seed, args.ema)
    train_s = time.perf_counter() - t0
    shape_net = train_shape_net(seed=args.seed)
    evaluator = Evaluator(shape_net)
    t1 = time.perf_counter()
    evaluation = evaluate(pipe, evaluator, args.eval_images)
    eval_s = time.perf_counter() - t1
    meta = {"recipe": "recipes/train/train_scenes.py", "settings": settings, "train_seconds": round(train_s, 1),
            "encode_seconds": round(encode_s, 1), "threads": args.threads,
            "final_loss_mean_100": sum(losses[-100:]) / len(losses[-100:]), "evaluation": evaluation}
    out = args.out or CHECKPOINTS / SCENES_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    save_scenes_testbed(pipe, out, shape_net, meta)
    print(json.dumps(meta, indent=1))
    print(f"trained in {train_s:.0f} s (captions encoded in {encode_s:.0f} s), evaluated in {eval_s:.0f} s; "
          f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    if not args.no_register and args.out is None:
        from recipes.train.manifest import register_in_place

        register_in_place(out, kind="testbed", recipe="recipes/train/train_scenes.py",
                          command=" ".join(["python -m recipes.train.train_scenes", *(sys.argv[1:] if argv is None else argv)]),
                          model=SCENES, train_seconds=round(train_s, 1), settings=settings, evaluation=evaluation)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
