"""DPO train step: jft vs trl's DPOTrainer (torch CPU), side by side, for LoRA and for full fine-tuning.

    python benchmarks/bench_dpo.py                 # --pairs 2 --prompt 64 --response 192 --steps 3

Same ~30M Llama shape on both sides (benchmarks/shapes.py), float32, sigmoid DPO loss with
beta=0.1, AdamW (no weight decay, no clipping on jft's side; trl's default max_grad_norm=1.0 is
turned off too), no dropout, the reference's log-probabilities computed in every step (no
precomputed reference). trl runs its default, no activation checkpointing; jft runs once per
--jft-remat policy: "none" is the like-for-like setting, "nothing_saveable" jft's default
(every layer recomputed in the backward pass), "dots_saveable" in between. LoRA: r=8, alpha=16 on q/k/v/o/gate/up/down,
the reference is the base with the adapters off on both sides. Full fine-tuning: the reference is
a frozen second copy of the model on both sides (jft: ``DPO.add_frozen``; trl: ``ref_model``).

Both sides get the same synthetic token pairs: each pair is a prompt of --prompt tokens and a
chosen and a rejected response of --response tokens each, so every sequence has exactly
L = prompt + response tokens and no padding; a step of --pairs pairs runs 2 * pairs * L tokens
through the policy (and as many through the reference). trl gets them pre-tokenized
(``prompt_ids``/``chosen_ids``/``rejected_ids``, its own collator), jft as ``tokenize_pairs``
rows (input_ids/attention_mask/targets/loss_weights [2, L], weight).

Each side and mode runs in a fresh process; trl once per --torch-threads value (torch's default
is one OpenMP thread per core, which on a CPU shared with other work can run several times slower
than one thread: its workers spin at barriers), the ratios against its faster run; jft runs XLA's
default thread pool. Timing: the first step apart (jft: compile plus the
first run; trl: the first step, which also builds the optimizer state), then the best of --steps
steps after it; trl's steps are timed by a callback (on_step_begin / on_step_end), not the whole
``train()`` call. Memory: the peak resident set size (VmHWM) during the steps minus the resident
size right after the policy model is built: it counts the reference copy (full FT), the
optimizer state, gradients and activations, not jft's compile (compiled ahead, then the peak is
reset through /proc/self/clear_refs). The children run with MALLOC_MMAP_THRESHOLD_=1 MiB, as
benchmarks/bench_longest.py explains. MiB = 2**20 bytes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

from shapes import LLAMA_30M

CHILD = "child"
MIB = 2**20
RANK, ALPHA = 8, 16.0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BETA, LR = 0.1, 1e-5


def _status_mib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB meaning KiB
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> float:
    """Hand freed heap pages back (malloc_trim), reset VmHWM (clear_refs 5); the RSS in MiB."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


def rss_mib() -> float:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _status_mib("VmRSS")


def synthetic_pairs(n: int, prompt: int, response: int, seed: int = 0) -> list[dict]:
    """``n`` pairs of token lists: a shared prompt, a chosen and a rejected response (ids >= 3)."""
    import numpy as np

    rs = np.random.RandomState(seed)
    draw = lambda k: rs.randint(3, LLAMA_30M["vocab_size"], k).tolist()
    return [dict(prompt_ids=draw(prompt), chosen_ids=draw(response), rejected_ids=draw(response)) for _ in range(n)]


def jft_rows(pairs: list[dict]) -> dict:
    """The pairs as one batch of jft preference rows ``[1 micro-batch, pairs, 2, L]``."""
    import numpy as np

    ids, weights = [], []
    for p in pairs:
        sides = [p["prompt_ids"] + p[k] for k in ("chosen_ids", "rejected_ids")]
        ids.append(sides)
        # loss weight 1 where the target (next token) is a response token, as tokenize_pairs places it
        w = np.zeros(len(sides[0]), np.float32)
        w[len(p["prompt_ids"]) - 1 : -1] = 1.0
        weights.append([w, w])
    ids = np.asarray(ids, np.int32)
    targets = np.concatenate([ids[..., 1:], np.zeros_like(ids[..., :1])], axis=-1)
    return {
        "input_ids": ids[None],
        "attention_mask": np.ones_like(ids)[None],
        "targets": targets[None],
        "loss_weights": np.asarray(weights, np.float32)[None],
        "margin": np.zeros((1, len(pairs)), np.float32),
        "weight": np.ones((1, len(pairs)), np.float32),
    }


def jft_side(mode: str, args) -> dict:
    import jax
    import jax.numpy as jnp

    from jft import peft
    from jft.config import default_config
    from jft.models.llama import LlamaConfig, LlamaForCausalLM
    from jft.objectives.dpo import DPO, dpo_loss
    from jft.train import TrainState, make_optimizer, make_train_step

    model = LlamaForCausalLM(LlamaConfig(**LLAMA_30M, remat=args.remat))
    params = model.init_params(jax.random.key(0))
    jax.block_until_ready(params)
    base = rss_mib()
    cfg = default_config()
    cfg.dpo.loss, cfg.dpo.beta, cfg.dpo.precompute_reference = "sigmoid", BETA, False
    if mode == "lora":
        spec = peft.Peft(lora=peft.Lora(r=RANK, alpha=ALPHA, targets=TARGETS))
        model, params = peft.inject(model, params, spec, jax.random.key(1))
        labels = peft.labels(params, model.peft)
    else:
        labels = jax.tree.map(lambda _: True, params)
    params, labels = DPO(cfg).add_frozen(model, params, labels)
    tx, schedule = make_optimizer(
        name="adamw", learning_rate=LR, total_steps=1000, warmup_steps=0, schedule="constant", clip_norm=None
    )
    state = TrainState.create(params, labels, tx, jax.random.key(2))
    del params
    # the same pairs as trl's side, a new batch every step
    pairs = synthetic_pairs(args.pairs * (args.steps + 1), args.prompt, args.response)
    batches = [
        jax.device_put({k: jnp.asarray(v) for k, v in jft_rows(pairs[i : i + args.pairs]).items()})
        for i in range(0, len(pairs), args.pairs)
    ]
    batch = batches[0]
    start = time.perf_counter()
    step = jax.jit(make_train_step(dpo_loss(model, cfg.dpo), tx, schedule), donate_argnums=0)
    step = step.lower(state, batch).compile()
    temp_mib = step.memory_analysis().temp_size_in_bytes / MIB
    compile_s = time.perf_counter() - start
    reset_peak()
    times, losses = [], []
    for batch in batches:
        start = time.perf_counter()
        state, metrics = step(state, batch)
        losses.append(float(jax.block_until_ready(metrics)["loss"]))
        times.append(time.perf_counter() - start)
    return dict(
        compile_s=compile_s,
        first_s=times[0],
        best_s=min(times[1:]),
        peak_mib=_status_mib("VmHWM") - base,
        train_loss=sum(losses) / len(losses),
        xla_temp_mib=temp_mib,
        tokens=int(metrics["tokens"]),
        trainable=sum(x.size for x in jax.tree.leaves(state.trainable)),
    )


def trl_side(mode: str, args) -> dict:
    import copy

    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    transformers.logging.set_verbosity_error()
    if int(args.torch_threads):
        torch.set_num_threads(int(args.torch_threads))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_30M), attn_implementation="sdpa").float()
    base = rss_mib()
    tok = word_tokenizer(LLAMA_30M["vocab_size"])  # trl reads pad / eos ids only: the pairs come pre-tokenized
    n = args.pairs * (args.steps + 1)
    data = Dataset.from_list(synthetic_pairs(n, args.prompt, args.response))
    ref_model, peft_config = None, None
    if mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=RANK, lora_alpha=int(ALPHA), lora_dropout=0.0, target_modules=list(TARGETS))
    else:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    config = DPOConfig(
        output_dir=os.path.join(args.workdir, f"trl_{mode}"),
        beta=BETA,
        loss_type="sigmoid",
        per_device_train_batch_size=args.pairs,
        gradient_accumulation_steps=1,
        max_length=args.prompt + args.response,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        max_steps=args.steps + 1,
        precompute_ref_log_probs=False,
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids

    times, tokens = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.start)

    trainer = PreTokenized(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=data,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[Timer()],
    )
    batch = next(iter(trainer.get_train_dataloader()))
    tokens = int(batch["attention_mask"].sum())
    reset_peak()
    out = trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return dict(
        first_s=times[0],
        best_s=min(times[1:]),
        peak_mib=_status_mib("VmHWM") - base,
        train_loss=out.training_loss,
        tokens=tokens,
        trainable=trainable,
        threads=torch.get_num_threads(),
    )


SIDES = {"jft": jft_side, "trl": trl_side}


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over ids 0..vocab_size-1: "w5 w17" is [5, 17]; pad 0, BOS 1, EOS 2.
    trl needs a tokenizer (pad / eos ids, and the text prompts of GRPO); the benchmarks' data
    are token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def run_child(side: str, mode: str, extra: tuple = (), script: str = __file__) -> dict:
    """One side of ``script`` in a fresh process (``MALLOC_MMAP_THRESHOLD_`` fixed): its JSON line,
    or ``{"error": [last line]}``."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MIB))
    cmd = [sys.executable, script, CHILD, side, mode, *sys.argv[1:], *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return dict(error=(proc.stderr or proc.stdout).strip().splitlines()[-1:])
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs per step")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per pair")
    parser.add_argument("--response", type=int, default=192, help="tokens of each response")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--workdir", default="/tmp/bench_dpo")
    parser.add_argument(
        "--jft-remat",
        default="none,dots_saveable,nothing_saveable",
        help="jft runs once per activation checkpointing policy (model.remat)",
    )
    parser.add_argument("--remat", default="none", help=argparse.SUPPRESS)  # one jft child's policy
    parser.add_argument(
        "--torch-threads",
        default="0,1",
        help="trl runs once per value (0: torch's default, one per core); the ratios take the fastest",
    )
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        side, mode = sys.argv[2], sys.argv[3]
        args = parser.parse_args(sys.argv[4:])
        print(json.dumps(SIDES[side](mode, args)))
        return
    args = parser.parse_args()
    from importlib.metadata import version

    import torch

    length = args.prompt + args.response
    per_step = 2 * args.pairs * length
    print(
        f"DPO (sigmoid, beta={BETA}) on the ~30M Llama shape, float32, AdamW lr={LR}; {args.pairs} pairs x 2 sides x "
        f"{length} tokens ({args.prompt} prompt + {args.response} response) = {per_step} tokens per step; "
        f"best of {args.steps} steps after the first; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
        f"torch {torch.__version__}, trl {version('trl')}, transformers {version('transformers')}, "
        f"peft {version('peft')}, jax {version('jax')}"
    )
    for mode in args.modes.split(","):
        res = {}
        for n in args.torch_threads.split(","):
            res[f"trl/{n or 'default'}"] = run_child("trl", mode, ("--torch-threads", n))
        for remat in args.jft_remat.split(","):
            res[f"jft/{remat}"] = run_child("jft", mode, ("--remat", remat))
        what = f"LoRA r={RANK} alpha={ALPHA:g} on {'/'.join(TARGETS)}" if mode == "lora" else "full fine-tuning"
        print(f"\n{mode}: {what}")
        for side, r in res.items():
            if "error" in r:
                print(f"  {side:20s} failed: {r['error']}")
                continue
            extra = f"compile {r['compile_s']:.1f} s, " if "compile_s" in r else ""
            extra += f"XLA temporaries {r['xla_temp_mib']:.1f} MiB, " if "xla_temp_mib" in r else ""
            extra += f"{r['threads']} torch threads, " if "threads" in r else ""
            print(
                f"  {side:20s} {r['tokens'] / r['best_s']:6.0f} tokens/s (best step {r['best_s']:.3f} s; "
                f"{extra}first step {r['first_s']:.2f} s), peak {r['peak_mib']:7.1f} MiB, "
                f"{r['tokens']} tokens/step, trainable {r['trainable']:,}, mean loss {r['train_loss']:.4f}"
            )
        trl = [r for k, r in res.items() if k.startswith("trl") and "error" not in r]
        if not trl:
            continue
        t = min(trl, key=lambda r: r["best_s"])
        print(
            f"  jft/trl against trl's faster run ({t['threads']} torch threads); goals: tokens/s >= 1.0, memory <= 1.0"
        )
        for side, j in res.items():
            if side.startswith("jft") and "error" not in j:
                speed = (j["tokens"] / j["best_s"]) / (t["tokens"] / t["best_s"])
                mem = j["peak_mib"] / t["peak_mib"]
                both = "both met" if speed >= 1 and mem <= 1 else "not both"
                print(f"    {side:18s} tokens/s {speed:.2f}x, peak memory {mem:.2f}x: {both}")


if __name__ == "__main__":
    main()
