"""`lesion train-dictionary`: train a sparse autoencoder on one site of a language model and save it in
SAELens's format."""

from __future__ import annotations

from recipes.jobs.flag_checks import finite_float, natural_int, positive_int

SITES = ("block_output", "block_input", "mlp_output", "attention_output")


def add_parser(sub, parents) -> None:
    td = sub.add_parser("train-dictionary", parents=parents, help="train a sparse autoencoder (TopK or ReLU + L1) "
                                                                  "on one site and save it in SAELens's format")
    td.add_argument("--model", default="smollm2-135m")
    td.add_argument("--site", default="block_output", choices=SITES)
    td.add_argument("--layer", type=natural_int, required=True)
    td.add_argument("--out", required=True, help="the dictionary folder to write (cfg.json, sae_weights.safetensors)")
    td.add_argument("--text", action="append", default=None, help="a UTF-8 text file, passages separated by blank "
                    "lines (repeatable); default: texts sampled from the model")
    td.add_argument("--texts", type=positive_int, default=512, help="texts sampled from the model (without --text)")
    td.add_argument("--length", type=positive_int, default=64, help="tokens per sampled text")
    td.add_argument("--flag-renders", type=positive_int, default=None, help="the flag testbed (--model "
                    "llava-flags-smollm2): this many jittered renders of every flag, read at the image tokens")
    td.add_argument("--architecture", default="topk", choices=("topk", "standard"))
    td.add_argument("--features", type=positive_int, default=4096)
    td.add_argument("--k", type=positive_int, default=32, help="active features per token (TopK)")
    td.add_argument("--l1", type=finite_float, default=0.3, help="L1 coefficient (standard)")
    td.add_argument("--epochs", type=positive_int, default=1)
    td.add_argument("--batch-tokens", type=positive_int, default=1024)
    td.add_argument("--buffer-tokens", type=positive_int, default=65536, help="activations held at once")
    td.add_argument("--lr", type=finite_float, default=None)
    td.add_argument("--seed", type=natural_int, default=0)
    td.set_defaults(fn=main)


def main(args) -> int:
    from recipes.train.train_dictionary import main as train

    return train(args)
