"""The ``jft`` command. It only parses flags and calls the library functions a notebook calls."""

from __future__ import annotations

import argparse
import json
import sys


def _load_model(args, command: str):
    """``(model, params, tokenizer)`` of ``--model`` (``--dtype``) with ``--adapter`` on top."""
    import jft
    from jft.config import ConfigError

    model, params = jft.load_hf(args.model, dtype=args.dtype)
    if args.adapter:
        model, params = jft.peft.load_adapter(model, params, args.adapter)
    tokenizer = jft.load_tokenizer(args.model)
    if tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer files; {command} needs one to encode the prompts")
    return model, params, tokenizer


def _model_flags(parser) -> None:
    """``--model``, ``--adapter`` and ``--dtype``, as :func:`_load_model` reads them."""
    parser.add_argument("--model", required=True, help="model folder (config.json, safetensors, tokenizer) or hub id")
    parser.add_argument("--adapter", default=None, help="a PEFT adapter folder to apply (peft's or jft's format)")
    parser.add_argument("--dtype", default=None, help="parameter dtype (default: the checkpoint's)")


def _generate(args, overrides) -> int:
    import jax
    import numpy as np

    import jft

    model, params, tokenizer = _load_model(args, "jft generate")
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


def _train(args, overrides) -> int:
    from jft.sharding import initialize_distributed

    # Before anything else touches JAX: join the other hosts of a pod (found automatically on
    # Cloud TPU VMs, SLURM and Kubernetes; --coordinator etc. elsewhere).
    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from jft.config import load_config
    from jft.train import fit

    report = fit(load_config(args.config, overrides), args.workdir)
    if report.get("status") == "preempted":
        return 0
    print(
        f"report: {args.workdir}/report.json; model: {report.get('hf', '(not exported)')}; "
        + (f"adapter: {report['adapter']}; " if "adapter" in report else "")
        + f"metrics: {args.workdir}/metrics.jsonl, {args.workdir}/tb, plot: {args.workdir}/loss.png"
    )
    return 0


def _eval(args, overrides) -> int:
    from jft.config import load_config
    from jft.train import evaluate

    config = load_config(args.config, overrides)
    report = evaluate(
        config, args.model, args.out, adapter=args.adapter, reference=args.reference, baseline=args.baseline
    )
    print(json.dumps({k: v for k, v in report.items() if k != "examples"}, indent=2))
    print(f"report: {args.out}")
    return 0


def _distill(args, overrides) -> int:
    from jft.config import load_config
    from jft.distill import distill

    report = distill(load_config(args.config, overrides), args.workdir)
    if report.get("status") == "preempted":
        return 0
    fit = report["fit"]
    print(
        f"distill report: {args.workdir}/distill/report.json; data: {args.workdir}/distill/data.jsonl "
        f"({report['data']['kept']} records); student: {fit.get('hf') or fit.get('adapter') or '(not exported)'}"
    )
    return 0


def _merge(args, overrides) -> int:
    from jft.merge import load_merge_config, merge_folders, merge_moe

    config = load_merge_config(args.config)
    run = merge_moe if "experts" in config else merge_folders  # mergekit-moe's form names experts
    out = run(config, args.out, seed=args.seed, max_shard_size=args.max_shard_size)
    print(f"merged model: {out}")
    return 0


def _toxicity(args, overrides) -> int:
    from jft.toxicity import load_scorer, read_prompts, toxicity_report, toxicity_table

    if overrides:
        print(f"error: jft toxicity takes no --config overrides: {' '.join(overrides)}", file=sys.stderr)
        return 2
    prompts = read_prompts(args.prompts, limit=args.limit)
    scorer = load_scorer(args.scorer, label=args.label, batch_size=args.batch_size)
    model, params, tokenizer = _load_model(args, "jft toxicity")
    report = toxicity_report(
        model,
        params,
        tokenizer,
        prompts,
        scorer,
        samples=args.samples,
        top_p=args.top_p,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
        out=args.out,
        meta={"model": args.model, "adapter": args.adapter, "prompts": args.prompts, "limit": args.limit},
    )
    print(toxicity_table(report))
    print(f"scorer: {report['scorer']}")
    print(f"report: {args.out}/toxicity.json; generations: {args.out}/generations.jsonl")
    return 0


def _plan(args, overrides) -> int:
    from jft.config import load_config
    from jft.plan import format_plan, plan

    devices = [d for item in args.device or () for d in item.split(",") if d] or None
    report = plan(load_config(args.config, overrides), args.size, devices, num_devices=args.num_devices)
    print(json.dumps(report, indent=2, default=str) if args.json else format_plan(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jft", description="Fine-tune decoder language models in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    gen = sub.add_parser("generate", help="continue prompts with a Hugging Face model folder")
    _model_flags(gen)
    gen.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    gen.add_argument("--seed", type=int, default=0, help="rng seed for sampling")
    gen.set_defaults(func=_generate)

    train = sub.add_parser(
        "train",
        help="fine-tune as a config file says; override fields with --config.a.b=value",
        description="Fine-tune as a config file says. Any field can be overridden: --config.optim.learning_rate=3e-4. "
        "Running again with the same workdir resumes from its latest checkpoint.",
    )
    train.add_argument("--config", required=True, help="a Python file with get_config(), e.g. configs/quickstart.py")
    train.add_argument("--workdir", required=True, help="where checkpoints, logs, reports and the model go")
    train.add_argument("--coordinator", default=None, help="multi-host run off TPU VMs: host:port of process 0")
    train.add_argument("--num-processes", type=int, default=None, help="multi-host run: number of processes")
    train.add_argument("--process-id", type=int, default=None, help="multi-host run: this process's id (0 ...)")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="a model's validation metrics on a config's data (loss, perplexity, ...)")
    ev.add_argument("--config", required=True, help="config file whose data.validation (or split) is scored")
    ev.add_argument("--model", required=True, help="Hugging Face model folder, e.g. WORKDIR/hf")
    ev.add_argument("--out", required=True, help="JSON report file to write")
    ev.add_argument("--adapter", default=None, help="a PEFT adapter folder to apply (peft's or jft's format)")
    ev.add_argument(
        "--reference", default=None, help="DPO configs: the reference policy's folder (the model training started from)"
    )
    ev.add_argument(
        "--baseline",
        default=None,
        help="a second model folder scored on the same records: a paired bootstrap says whether the loss "
        "difference is significant (writes OUT.slices.json and OUT.slices.png)",
    )
    ev.set_defaults(func=_eval)

    dist = sub.add_parser(
        "distill",
        help="a teacher answers prompts, the student fine-tunes on the answers (sequence-level distillation)",
        description="Sequence-level distillation: distill.teacher answers distill.prompts (default data.train), the "
        "answers become SFT records in WORKDIR/distill/data.jsonl, and the config's model trains on them as jft train "
        "does; WORKDIR/distill/report.json compares teacher and student. Override fields with --config.a.b=value. "
        "Running again with the same workdir resumes generation, then training.",
    )
    dist.add_argument("--config", required=True, help="a Python file with get_config(), e.g. configs/distill_llama.py")
    dist.add_argument("--workdir", required=True, help="where generations, data, checkpoints, reports and the model go")
    dist.set_defaults(func=_distill)

    merge = sub.add_parser(
        "merge",
        help="merge Hugging Face models as a mergekit-style YAML says",
        description="Merge models (linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, "
        "breadcrumbs_ties, slerp, model_stock) or stack layer slices (passthrough), from a mergekit-style YAML; "
        "or build a Mixtral-style mixture of experts from mergekit-moe's YAML (base_model, experts, gate_mode).",
    )
    merge.add_argument("config", help="merge YAML: merge_method, base_model, models or slices, parameters, dtype")
    merge.add_argument("--out", required=True, help="new folder for the merged model (must be empty)")
    merge.add_argument("--seed", type=int, default=0, help="seed of the random methods (dare_*)")
    merge.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 2GB")
    merge.set_defaults(func=_merge)

    tox = sub.add_parser(
        "toxicity",
        help="toxicity of a model's continuations, as RealToxicityPrompts measures it",
        description="Sample --samples continuations per prompt (nucleus sampling), score each with --scorer, and "
        "report Expected Maximum Toxicity and Toxicity Probability with 95% intervals, overall and for toxic, "
        "non-toxic and challenging prompts. Writes OUT/toxicity.json and OUT/generations.jsonl.",
    )
    _model_flags(tox)
    tox.add_argument(
        "--prompts", required=True, help="RealToxicityPrompts prompts.jsonl, {'prompt': str} JSONL, or a .txt"
    )
    tox.add_argument(
        "--scorer",
        default="lexicon",
        help="hf:FOLDER (transformers classifier, needs torch), jft:FOLDER, a classifier folder, module:function, "
        "or lexicon (default: a demo word list, not a toxicity classifier)",
    )
    tox.add_argument("--label", default=None, help="the classifier's toxic label (default: toxic/toxicity/LABEL_1)")
    tox.add_argument("--samples", type=int, default=25, help="continuations per prompt")
    tox.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    tox.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    tox.add_argument("--max-new-tokens", type=int, default=20, help="tokens per continuation")
    tox.add_argument("--limit", type=int, default=None, help="score the first N prompts only")
    tox.add_argument("--seed", type=int, default=0, help="rng seed for sampling and the bootstrap")
    tox.add_argument("--batch-size", type=int, default=128, help="rows (prompt x sample) generated at once")
    tox.add_argument("--out", required=True, help="folder for toxicity.json and generations.jsonl")
    tox.set_defaults(func=_toxicity)

    plan = sub.add_parser(
        "plan",
        help="the memory a config's training needs per device, and which devices it fits",
        description="Plan a run's memory without loading weights or compiling: parameters (total, trainable) and, "
        "per device of the config's mesh, weights, gradients, optimizer state and activations, against T4, A100, "
        "H100 and TPU v5e / v4 / v5p. Shapes come from model.path's config.json or --size. Override fields with "
        "--config.a.b=value, as for jft train.",
    )
    plan.add_argument("--config", required=True, help="a Python file with get_config(), e.g. configs/lora_llama.py")
    plan.add_argument("--size", default=None, help="a known model's shapes instead of model.path's, e.g. llama-2-7b")
    plan.add_argument(
        "--device", action="append", help="check only this device (repeat, or comma-separate): T4, A100, H100, v5e, ..."
    )
    plan.add_argument("--num-devices", type=int, default=None, help="mesh devices (fills its -1 size; default 1)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--config.")]
    if args.command is None:
        parser.print_help()
        return 0
    if args.command in ("generate", "merge"):
        overrides = []
    if len(overrides) != len(rest):
        parser.error(f"unrecognized arguments: {' '.join(a for a in rest if a not in overrides)}")
    from jft.config import ConfigError
    from jft.data import DataError
    from jft.hf import CheckpointError
    from jft.merge import MergeError
    from jft.train.trainer import TrainingError

    try:
        return args.func(args, overrides)
    except (CheckpointError, ConfigError, DataError, MergeError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
