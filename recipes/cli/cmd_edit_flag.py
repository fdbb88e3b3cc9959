"""`lesion edit-flag`: on the vision-language testbed, a ROME edit read at the image tokens of one flag."""

from __future__ import annotations

from recipes.jobs.flag_checks import finite_float, natural_int, positive_int


def add_parser(sub, parents) -> None:
    ef = sub.add_parser("edit-flag", parents=parents, help="vision-language testbed: ROME edit read at the image tokens of one flag")
    ef.add_argument("--out", required=True)
    ef.add_argument("--country", default="France")
    ef.add_argument("--target", default="Rome")
    ef.add_argument("--layer", type=natural_int, default=4)
    ef.add_argument("--mom2-tokens", type=positive_int, default=20_000)
    ef.add_argument("--seed", type=natural_int, default=3_000_000)
    ef.add_argument("--renders", type=positive_int, default=1, metavar="N",
                    help="read k* and optimise v* over N jittered renders of the flag (ROME's context templates, for images)")
    ef.add_argument("--kl-factor", type=finite_float, default=1.0,
                    help="weight of v*'s KL term on the naming prompt (ROME's default 0.0625 lets the flag's identity drift)")
    ef.add_argument("--image-stats", type=natural_int, default=0, metavar="N",
                    help="add the image-token key statistics of N jittered renders of every flag to C (0: text only)")
    ef.add_argument("--checkpoint", default=None, metavar="NAME", help="also ship the delta as checkpoints/NAME.safetensors")
    ef.set_defaults(fn=main)


def main(args) -> int:
    from recipes.studies.edit_flag import main as edit_flag

    return edit_flag(args)
