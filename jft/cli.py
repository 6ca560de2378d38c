"""The ``jft`` command. It only parses flags and calls the library functions a notebook calls."""

from __future__ import annotations

import argparse
import sys


def _generate(args) -> int:
    import jax
    import numpy as np

    import jft

    model, params = jft.load_hf(args.model, dtype=args.dtype)
    tokenizer = jft.load_tokenizer(args.model)
    if tokenizer is None:
        print(
            f"error: {args.model} has no tokenizer files; jft generate needs one to encode the prompt", file=sys.stderr
        )
        return 2
    prompts = args.prompt
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(prompts, padding=True, return_tensors="np")
    tokens = jft.generate(
        model,
        params,
        enc["input_ids"],
        args.max_new_tokens,
        attention_mask=enc["attention_mask"],
        rng=jax.random.key(args.seed),
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )
    for prompt, row in zip(prompts, np.asarray(tokens), strict=True):
        print(prompt + tokenizer.decode(row, skip_special_tokens=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jft", description="Fine-tune decoder language models in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    gen = sub.add_parser("generate", help="continue prompts with a Hugging Face model folder")
    gen.add_argument("--model", required=True, help="model folder (config.json, safetensors, tokenizer) or hub id")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    gen.add_argument("--seed", type=int, default=0, help="rng seed for sampling")
    gen.add_argument("--dtype", default=None, help="parameter dtype (default: the checkpoint's)")
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from jft.hf import CheckpointError

    try:
        return args.func(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
