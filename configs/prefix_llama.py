"""Prefix tuning: 20 learned key/value pairs in front of every layer's attention.

    jft train --config configs/prefix_llama.py --workdir runs/prefix \
        --config.model.path=/path/to/Llama-3.2-1B --config.data.train=/path/to/train.jsonl

Trained through an MLP reparametrisation, saved (folded) in PEFT format.
"""

from jft.config import default_config


def get_config():
    c = default_config()
    c.model.path = ""  # required: a Hugging Face model folder
    c.model.compute_dtype = "bfloat16"
    c.data.train = ""  # required: training records
    c.data.seq_len = 1024
    c.train.batch_size = 16
    c.train.epochs = 2
    c.peft.methods = ("prefix",)
    c.peft.prefix.num_virtual_tokens = 20  # prefix length
    c.peft.prefix.projection_dim = 512  # MLP reparametrisation width
    c.optim.learning_rate = 1e-2
    return c
