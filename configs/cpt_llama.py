"""Continued pretraining of a Hugging Face Llama-family model on a domain corpus, mixed with
instruction data to limit forgetting, tokenized once into an on-disk cache.

    jft train --config configs/cpt_llama.py --workdir runs/cpt \
        --config.model.path=/path/to/Llama-3.2-1B \
        --config.data.mixture='(("/data/domain/", 0.9), ("/data/instructions.jsonl", 0.1))' \
        --config.data.validation=/data/validation.jsonl

The domain folder holds .txt / .jsonl(.gz) / parquet shards of any total size: with
data.cache_dir and data.validation set, data.num_proc processes read them in pieces and tokenize
them once into memory-mapped shards that every later run, resume and host reuses; training reads
each batch's rows (only this host's share of them) from disk. Every parameter trains, with float32
masters and bfloat16 compute. Domain tokens (tokenizer.add_tokens, tokenizer.learn_tokens) start at
the mean embedding and train with the rest; the log and report.json give the tokens per word of the
corpus before and after.
"""

from jft.config import default_config


def get_config():
    c = default_config()
    c.model.path = ""  # required: a Hugging Face model folder (config.json, safetensors, tokenizer)
    c.model.dtype = "float32"  # master weights and Adam moments in float32
    c.model.compute_dtype = "bfloat16"  # matmuls and activations in bfloat16
    c.model.remat = "nothing_saveable"  # recompute each layer in the backward pass
    c.tokenizer.add_tokens = ()  # domain terms to add as whole tokens, e.g. ("mRNA", "CRISPR")
    c.tokenizer.learn_tokens = 0  # or learn this many from the corpus (frequent words split into 2+ tokens)
    c.data.train = ""  # the sources are in data.mixture
    c.data.mixture = ()  # required: ((domain source, 0.9), (instruction source, 0.1)), see above
    c.data.validation = ""  # required for streaming: held-out records (nothing is split off the corpus)
    c.data.text_unit = "line"  # .txt shards: a record per line; "document" for a record per file
    c.data.seq_len = 2048
    c.data.prompt_loss_weight = 0.0  # the instruction part: completion-only loss
    c.data.cache_dir = "~/.cache/jft/data"  # tokenized once here (a shared disk on a pod serves every host)
    c.data.num_proc = 8  # processes that tokenize the corpus
    c.train.batch_size = 32
    c.train.grad_accum = 8  # 8 micro-batches of 4 rows
    c.train.epochs = 1  # the domain corpus once; the smaller instruction source repeats to keep its share
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.optim.learning_rate = 2e-5
    c.optim.weight_decay = 0.01
    return c
