"""Sequence-level distillation: Llama-3-8B-Instruct answers chat prompts, Llama-3.2-1B-Instruct learns
its answers with LoRA (r=16 on every decoder linear).

    jft distill --config configs/distill_llama.py --workdir runs/distill \
        --config.distill.prompts=/path/to/prompts.jsonl

Needs one accelerator with 40 GB or more (an A100 / H100, or a TPU host whose chips the mesh spreads the
teacher over): the teacher in bfloat16 (16 GB) and its KV cache for 16 x 2 rows of 2560 slots (about
11 GB); it is freed before the student (2.5 GB + LoRA) trains. Both models are gated on the hub:
log in with `huggingface-cli login`, or pass downloaded folders (--config.distill.teacher=/path,
--config.model.path=/path). Prompt records: chat {"messages": [...]} (a last assistant turn is dropped and
answered anew), {"prompt": str | messages} or instruction records.

Writes runs/distill/distill/: generations.jsonl (raw answers; a rerun resumes), data.jsonl (the kept
records), stats.json and report.json (teacher vs student before / after: validation loss, perplexity,
size, tokens/s); then what jft train writes: the adapter (peft format) and the merged student in hf/.
"""

from jft.config import default_config


def get_config():
    c = default_config()
    c.model.path = "meta-llama/Llama-3.2-1B-Instruct"  # the student: same tokenizer and chat template as the teacher
    c.model.dtype = "bfloat16"  # the frozen student base, the teacher and the LoRA weights (kahan below)
    c.model.compute_dtype = "bfloat16"
    c.data.train = ""  # unused when distill.prompts is set: the student trains on WORKDIR/distill/data.jsonl
    c.data.validation = ""  # "" = hold out data.validation_fraction of the generated records
    c.data.seq_len = 2048  # prompt (up to seq_len - distill.max_new_tokens = 1536 tokens) + answer
    c.data.prompt_loss_weight = 0.0  # learn the teacher's answers, not the prompts
    c.train.batch_size = 16
    c.train.epochs = 2
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    c.peft.methods = ("lora",)
    c.peft.lora.r = 16  # rank
    c.peft.lora.alpha = 32.0  # scale alpha / r = 2
    c.peft.lora.dropout = 0.05  # on the LoRA input while training
    c.optim.learning_rate = 2e-4
    c.optim.bf16_update = "kahan"  # bf16 LoRA weights keep small updates (+2 bytes per adapter weight)
    c.eval.num_examples = 32  # held-out prompts answered greedily by teacher and student, scored against the data
    c.eval.max_new_tokens = 256
    c.eval.metrics = ("chrf", "rouge")  # open-ended answers: overlap, not exact match
    c.distill.teacher = "meta-llama/Meta-Llama-3-8B-Instruct"  # the teacher: a model folder or hub id
    c.distill.prompts = ""  # required: prompt records (chat, {"prompt"} or instruction)
    c.distill.num_samples = 2  # answers per prompt (different ones: sampled)
    c.distill.max_new_tokens = 512  # answers longer than this are cut and dropped (drop_truncated)
    c.distill.sample_temperature = 0.7  # sampled answers, a little sharper than the teacher's distribution
    c.distill.sample_top_p = 0.9  # nucleus sampling: no tokens from the long tail
    c.distill.generate_batch_size = 16  # prompts per generation batch (x num_samples rows)
    c.export.dtype = "bfloat16"  # the merged student in hf/
    return c
