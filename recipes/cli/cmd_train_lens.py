"""`lesion train-lens`: train a tuned lens (Belrose et al. 2023) on text the model writes itself, and save it as safetensors."""

from __future__ import annotations

from recipes.jobs.flag_checks import finite_float, natural_int, positive_int


def add_parser(sub, parents) -> None:
    tl = sub.add_parser("train-lens", parents=parents, help="train a tuned lens (Belrose et al. 2023) on text the "
                                                            "model writes itself, and save it as safetensors")
    tl.add_argument("--model", default="smollm2-135m")
    tl.add_argument("--out", required=True, help="the tuned lens file to write")
    tl.add_argument("--texts", type=positive_int, default=160, help="texts sampled from the model")
    tl.add_argument("--length", type=positive_int, default=64, help="tokens per sampled text")
    tl.add_argument("--rank", type=natural_int, default=64, help="translator rank (0: full d x d)")
    tl.add_argument("--steps", type=positive_int, default=150)
    tl.add_argument("--batch-tokens", type=positive_int, default=128)
    tl.add_argument("--lr", type=finite_float, default=1e-3)
    tl.add_argument("--max-tokens", type=positive_int, default=8192)
    tl.add_argument("--seed", type=natural_int, default=0)
    tl.set_defaults(fn=main)


def main(args) -> int:
    from recipes.train.train_lens import main as train

    return train(args)
