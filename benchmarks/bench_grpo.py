"""GRPO iteration (rollout + update): jft vs trl's GRPOTrainer (torch CPU), side by side.

    python benchmarks/bench_grpo.py        # --prompts 4 --generations 4 --prompt 64 --completion 64 --steps 3

Same ~30M Llama shape on both sides (benchmarks/shapes.py), float32, random weights, no dropout.
An iteration samples --generations completions of exactly --completion tokens for each of --prompts
prompts of --prompt tokens (temperature 1, no top-k / top-p), scores them with the same Python
reward (the share of even token ids in a completion), normalises the rewards within each group
(mean and std) and makes one AdamW step (lr 1e-5, constant, no weight decay, no clipping) on the
clipped GRPO loss: epsilon 0.2, token-level importance, beta 0 (no reference model), "dapo"
aggregation, one update per rollout (the ratio is 1, exactly on-policy). Modes: LoRA r=8, alpha=16
on q/k/v/o/gate/up/down, and full fine-tuning.

No completion ends early on either side: jft samples with ``eos_token_id=()`` (nothing stops a row,
and every token counts); trl gets ``generation_kwargs={"min_new_tokens": C}``, so its sampler masks
the EOS id for the whole completion. The tokens each side actually generated and trained are counted
and printed (and flagged if trl's are fewer than prompts x generations x completion).

What is timed (best of --steps iterations after the first, which is printed apart):
- sampling: jft ``jft.generate.generate`` (one jitted prefill, one jitted decode loop with the KV
  cache), until the ids are on the host; trl ``GRPOTrainer._generate_single_turn`` (left padding and
  ``model.generate`` with its generation config, then the EOS masking). rollout tokens/s = completion
  tokens generated / this time.
- rollout: sampling plus rewards and advantages (jft: ``completion_mask``, ``completion_rows``, the
  reward, ``group_advantages``; trl: ``_generate_and_score_completions``, which also tokenizes the
  prompts and decodes the completions). Printed, not a goal.
- update: jft one jitted ``make_train_step(grpo_loss(...))`` call, compiled ahead (the compile is
  printed apart); trl the training step, from the ``on_step_begin`` to the ``on_step_end`` callback,
  minus its ``_generate_and_score_completions`` call: the forward and backward pass of the loss,
  the optimizer step and the Trainer's own work around them. update tokens/s = completion tokens
  trained / this time.

trl generates once per optimizer step (``steps_per_generation`` = gradient accumulation = 1,
``num_iterations`` = 1, so it keeps no old log-probabilities either). jft runs its default
activation checkpointing (``remat="nothing_saveable"``: every layer recomputed in the backward
pass); trl runs without gradient checkpointing, its default. Each side and mode runs in a fresh
process; trl once per --torch-threads value (torch's default is one OpenMP thread per core; see
bench_dpo.py), the ratios against its faster run; jft runs XLA's default thread pool.

Memory: the peak resident set size (VmHWM) minus the resident size right after the policy model is
built, taken apart for the rollout and the update of each timed iteration (reset through
/proc/self/clear_refs before each phase, outside the timed regions); printed: the larger of the two
over the timed iterations (rollout peak / update peak in brackets). It counts the KV cache and
sampling buffers, optimizer state, gradients and activations; not jft's compile. The children run
with MALLOC_MMAP_THRESHOLD_=1 MiB, as benchmarks/bench_longest.py explains. MiB = 2**20 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import bench_dpo
from bench_dpo import ALPHA, LR, RANK, TARGETS, _status_mib, reset_peak, rss_mib, word_tokenizer
from shapes import LLAMA_30M

CHILD = "child"
EPSILON = 0.2
GOALS = {"rollout": 2.0, "update": 1.0}


def even_share(completions=None, completion_ids=None, **_) -> list[float]:
    """The reward of both sides: the share of even token ids in each completion."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def synthetic_prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of ``length`` token ids each (ids >= 3: no pad, BOS or EOS)."""
    import numpy as np

    rs = np.random.RandomState(seed)
    return [rs.randint(3, LLAMA_30M["vocab_size"], length).tolist() for _ in range(n)]


def jft_side(mode: str, args) -> dict:
    import types

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jft import partition, peft
    from jft.generate import generate
    from jft.models.llama import LlamaConfig, LlamaForCausalLM
    from jft.objectives.grpo import grpo_loss
    from jft.objectives.policy_gradient import group_advantages
    from jft.objectives.rl import completion_mask, completion_rows
    from jft.train import TrainState, make_optimizer, make_train_step

    B, G, C = args.prompts, args.generations, args.completion
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_30M, eos_token_id=(2,), pad_token_id=0))
    params = model.init_params(jax.random.key(0))
    jax.block_until_ready(params)
    base = rss_mib()
    if mode == "lora":
        spec = peft.Peft(lora=peft.Lora(r=RANK, alpha=ALPHA, targets=TARGETS))
        model, params = peft.inject(model, params, spec, jax.random.key(1))
        labels = peft.labels(params, model.peft)
    else:
        labels = jax.tree.map(lambda _: True, params)
    settings = types.SimpleNamespace(
        epsilon=EPSILON,
        epsilon_high=0.0,
        importance_sampling_level="token",
        beta=0.0,
        loss_type="dapo",
        max_completion_length=C,
        temperature=1.0,
    )
    tx, schedule = make_optimizer(
        name="adamw", learning_rate=LR, total_steps=1000, warmup_steps=0, schedule="constant", clip_norm=None
    )
    state = TrainState.create(params, labels, tx, jax.random.key(2))
    del params
    prompts = synthetic_prompts(B * (args.steps + 1), args.prompt)
    prompt_mask = np.ones((B * G, args.prompt), np.int32)

    def rollout(state, i):
        """One rollout of the i-th B prompts: (train batch, sampling s, rollout s, completion tokens)."""
        prompt_ids = np.repeat(np.asarray(prompts[i * B : (i + 1) * B], np.int32), G, axis=0)
        params = partition.join(state.trainable, state.frozen)
        key = jax.random.fold_in(jax.random.key(3), i)
        start = time.perf_counter()
        comps = np.asarray(generate(model, params, prompt_ids, C, rng=key, temperature=1.0, eos_token_id=()))
        sampled = time.perf_counter()
        mask, _ = completion_mask(comps, ())
        rewards = np.asarray(even_share(completion_ids=comps.tolist()), np.float32)
        advantages, _ = group_advantages(jnp.asarray(rewards), G)
        rows = completion_rows(jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), jnp.asarray(comps), mask)
        batch = {k: v[None] for k, v in rows.items()} | {"advantages": advantages[None]}
        jax.block_until_ready(batch)
        done = time.perf_counter()
        return batch, sampled - start, done - start, int(np.asarray(mask).sum())

    step = jax.jit(make_train_step(grpo_loss(model, settings), tx, schedule), donate_argnums=0)
    rec = dict(sample_s=[], rollout_s=[], update_s=[], gen_tokens=[], train_tokens=[], losses=[], peaks=[])
    compile_s = 0.0
    for i in range(args.steps + 1):
        reset_peak()
        batch, sample_s, rollout_s, gen_tokens = rollout(state, i)
        peaks = [_status_mib("VmHWM") - base]
        if i == 0:  # the step compiled ahead, out of the timed update
            start = time.perf_counter()
            step = step.lower(state, batch).compile()
            compile_s = time.perf_counter() - start
        reset_peak()
        start = time.perf_counter()
        state, metrics = step(state, batch)
        rec["losses"].append(float(jax.block_until_ready(metrics)["loss"]))
        rec["update_s"].append(time.perf_counter() - start)
        peaks.append(_status_mib("VmHWM") - base)
        rec["sample_s"].append(sample_s)
        rec["rollout_s"].append(rollout_s)
        rec["gen_tokens"].append(gen_tokens)
        rec["train_tokens"].append(int(metrics["tokens"]))
        rec["peaks"].append(peaks)
    return dict(
        rec,
        compile_s=compile_s,
        trainable=sum(x.size for x in jax.tree.leaves(state.trainable)),
        remat=model.config.remat,
    )


def trl_side(mode: str, args) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    if int(args.torch_threads):
        torch.set_num_threads(int(args.torch_threads))
    torch.manual_seed(0)
    B, G, C = args.prompts, args.generations, args.completion
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_30M), attn_implementation="sdpa").float()
    base = rss_mib()
    tok = word_tokenizer(LLAMA_30M["vocab_size"])  # the text "w5 w17 ..." is the ids 5, 17, ...
    prompts = synthetic_prompts(B * (args.steps + 1), args.prompt)
    data = Dataset.from_list([{"prompt": " ".join(f"w{t}" for t in p)} for p in prompts])
    assert tok(data[0]["prompt"])["input_ids"] == prompts[0], "the tokenizer does not map the text back to the ids"
    peft_config = None
    if mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=RANK, lora_alpha=int(ALPHA), lora_dropout=0.0, target_modules=list(TARGETS))
    config = GRPOConfig(
        output_dir=os.path.join(args.workdir, f"trl_{mode}"),
        per_device_train_batch_size=B * G,
        gradient_accumulation_steps=1,
        num_generations=G,
        max_completion_length=C,
        generation_kwargs={"min_new_tokens": C},  # EOS masked: every completion is C tokens, as jft's
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=0.0,
        epsilon=EPSILON,
        importance_sampling_level="token",
        loss_type="dapo",
        scale_rewards="group",
        num_iterations=1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        max_steps=args.steps + 1,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to=[],
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    rec = dict(sample_s=[], rollout_s=[], update_s=[], gen_tokens=[], train_tokens=[], peaks=[])
    pending = {}  # the current step's rollout: its times and its time to subtract from the step

    class Timed(GRPOTrainer):
        def _generate_single_turn(self, *a, **kw):
            start = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(*a, **kw)
            pending["sample_s"] = time.perf_counter() - start
            pending["gen_tokens"] = sum(len(c) for c in completion_ids)
            return completion_ids, logprobs

        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            reset_peak()
            began = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            ended = time.perf_counter()
            pending["rollout_peak"] = _status_mib("VmHWM") - base
            pending["train_tokens"] = int(out["completion_mask"].sum())
            reset_peak()
            pending["rollout_s"] = ended - began
            pending["outside_update_s"] = time.perf_counter() - start
            return out

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            pending.clear()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_s = time.perf_counter() - self.start
            assert "rollout_s" in pending, "no rollout in this step"
            rec["update_s"].append(step_s - pending["outside_update_s"])
            rec["peaks"].append([pending["rollout_peak"], _status_mib("VmHWM") - base])
            for k in ("sample_s", "rollout_s", "gen_tokens", "train_tokens"):
                rec[k].append(pending[k])

    trainer = Timed(
        model=model,
        reward_funcs=even_share,
        args=config,
        train_dataset=data,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[Timer()],
    )
    out = trainer.train()
    return dict(
        rec,
        losses=[out.training_loss],
        trainable=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        threads=torch.get_num_threads(),
    )


SIDES = {"jft": jft_side, "trl": trl_side}


def run_child(side: str, mode: str, extra: tuple = ()) -> dict:
    r = bench_dpo.run_child(side, mode, extra, script=__file__)
    return r if "error" in r else summarize(r)


def summarize(r: dict) -> dict:
    """Best-of times after the first iteration, tokens/s, peaks over the timed iterations."""
    timed = slice(1, None)
    best = lambda k: min(r[k][timed])
    i_sample = min(range(1, len(r["sample_s"])), key=lambda i: r["sample_s"][i])
    i_update = min(range(1, len(r["update_s"])), key=lambda i: r["update_s"][i])
    peaks = r["peaks"][timed]
    return dict(
        r,
        rollout_tps=r["gen_tokens"][i_sample] / r["sample_s"][i_sample],
        update_tps=r["train_tokens"][i_update] / r["update_s"][i_update],
        best_sample_s=best("sample_s"),
        best_rollout_s=best("rollout_s"),
        best_update_s=best("update_s"),
        first_sample_s=r["sample_s"][0],
        first_update_s=r["update_s"][0],
        rollout_peak=max(p[0] for p in peaks),
        update_peak=max(p[1] for p in peaks),
        peak_mib=max(max(p) for p in peaks),
        loss=sum(r["losses"]) / len(r["losses"]),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4, help="prompts per iteration (B)")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt (G, num_generations)")
    parser.add_argument("--prompt", type=int, default=64, help="tokens of each prompt (P)")
    parser.add_argument("--completion", type=int, default=64, help="tokens of each completion (C)")
    parser.add_argument("--steps", type=int, default=3, help="timed iterations after the first")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--workdir", default="/tmp/bench_grpo")
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

    B, G, C = args.prompts, args.generations, args.completion
    expected = B * G * C
    print(
        f"GRPO iteration on the ~30M Llama shape (hidden {LLAMA_30M['hidden_size']}, "
        f"{LLAMA_30M['num_hidden_layers']} layers, vocab {LLAMA_30M['vocab_size']}), float32: {B} prompts x {G} "
        f"generations = {B * G} completions of {C} tokens after {args.prompt}-token prompts ({expected} completion "
        f"tokens per iteration), temperature 1; loss dapo, epsilon {EPSILON}, beta 0, AdamW lr={LR}; best of "
        f"{args.steps} iterations after the first; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
        f"torch {torch.__version__}, trl {version('trl')}, transformers {version('transformers')}, "
        f"peft {version('peft')}, jax {version('jax')}"
    )
    for mode in args.modes.split(","):
        res = {}
        for n in args.torch_threads.split(","):
            res[f"trl/{n or 'default'}"] = run_child("trl", mode, ("--torch-threads", n))
        res["jft"] = run_child("jft", mode)
        what = f"LoRA r={RANK} alpha={ALPHA:g} on {'/'.join(TARGETS)}" if mode == "lora" else "full fine-tuning"
        print(f"\n{mode}: {what}")
        for side, r in res.items():
            if "error" in r:
                print(f"  {side:8s} failed: {r['error']}")
                continue
            setting = f"remat {r['remat']}" if "remat" in r else f"{r['threads']} torch threads"
            first = f"first sampling {r['first_sample_s']:.2f} s (compiles), " if "remat" in r else ""
            first += f"compile {r['compile_s']:.1f} s, " if "compile_s" in r else ""
            print(
                f"  {side:8s} rollout {r['rollout_tps']:6.0f} tokens/s (sampling {r['best_sample_s']:.3f} s, "
                f"with rewards and advantages {r['best_rollout_s']:.3f} s), update {r['update_tps']:5.0f} tokens/s "
                f"({r['best_update_s']:.3f} s); {setting}; {first}first update {r['first_update_s']:.2f} s; "
                f"peak {r['peak_mib']:6.1f} MiB (rollout {r['rollout_peak']:.1f} / update {r['update_peak']:.1f}); "
                f"tokens generated {min(r['gen_tokens'])}-{max(r['gen_tokens'])}, trained "
                f"{min(r['train_tokens'])}-{max(r['train_tokens'])} per iteration; trainable {r['trainable']:,}; "
                f"mean loss {r['loss']:.1e}"
            )
            if min(r["gen_tokens"]) < expected:
                print(f"    {side}: completions stopped early: {min(r['gen_tokens'])} < {expected} tokens generated")
        trl = [r for k, r in res.items() if k.startswith("trl") and "error" not in r]
        j = res["jft"]
        if not trl or "error" in j:
            continue
        t_roll = max(trl, key=lambda r: r["rollout_tps"])
        t_upd = max(trl, key=lambda r: r["update_tps"])
        print("  jft/trl against trl's faster run of each phase:")
        for phase, t in (("rollout", t_roll), ("update", t_upd)):
            ratio = j[f"{phase}_tps"] / t[f"{phase}_tps"]
            met = "met" if ratio >= GOALS[phase] else "not met"
            print(
                f"    {phase:8s} tokens/s {ratio:.2f}x ({t['threads']} torch threads); goal >= {GOALS[phase]:g}x {met}"
            )
        t_mem = min(trl, key=lambda r: r["peak_mib"])
        print(f"    peak memory {j['peak_mib'] / t_mem['peak_mib']:.2f}x ({t_mem['threads']} torch threads; no goal)")


if __name__ == "__main__":
    main()
