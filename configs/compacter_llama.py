"""Compacter: bottleneck adapters built from Kronecker products with shared rules.

    jft train --config configs/compacter_llama.py --workdir runs/compacter \
        --config.model.path=/path/to/Llama-3.2-1B --config.data.train=/path/to/train.jsonl

phm_dim must divide hidden_size and the bottleneck width. Saved in jft's adapter format.
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
    c.peft.methods = ("adapter",)
    c.peft.adapter.kind = "houlsby"  # pfeiffer = Compacter++
    c.peft.adapter.reduction_factor = 16  # bottleneck width hidden / 16
    c.peft.adapter.phm_dim = 4  # shared rule matrices [4, 4]
    c.optim.learning_rate = 3e-3
    return c
